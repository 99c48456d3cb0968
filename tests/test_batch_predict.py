"""Streaming prediction: same rows as the in-memory path, bounded look-ahead, resume after a kill, shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.cli import main
from pipelines.prediction import Predictor

REPO = Path(__file__).resolve().parent.parent
HAM_SAMPLE = REPO / "data" / "ham10000_sample"


@pytest.fixture
def folder(tmp_path) -> Path:
    target = tmp_path / "images"
    target.mkdir()
    for src in sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:11]:
        shutil.copy(src, target / src.name)
    (target / "broken.jpg").write_bytes(b"not a jpeg")
    return target


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("image_id").reset_index(drop=True)


def test_stream_equals_the_in_memory_prediction_and_looks_ahead_one_batch(tiny_bundle, folder, tmp_path,
                                                                          monkeypatch):
    import pipelines.batch_predict as bp

    predictor = Predictor.from_path(tiny_bundle, tta=1)
    files = sorted(folder.glob("*.jpg"))
    loaded, seen_at_predict = [], []
    real_load, real_predict = bp._load, predictor.predict

    def counting_load(path, pred):
        loaded.append(path)
        return real_load(path, pred)

    def counting_predict(images):
        seen_at_predict.append(len(loaded))
        return real_predict(images)

    monkeypatch.setattr(bp, "_load", counting_load)
    monkeypatch.setattr(predictor, "predict", counting_predict)
    result = bp.predict_stream(predictor, files, tmp_path / "p.csv", batch_size=3, workers=2)
    assert result.written == 11 and len(result.errors) == 1 and "broken.jpg" in str(result.errors[0])
    # When batch b reaches the network, only it and batch b + 1 have been decoded: memory holds two batches.
    assert len(seen_at_predict) == 4
    assert all(n <= 3 * (b + 2) for b, n in enumerate(seen_at_predict)), seen_at_predict
    direct, _ = Predictor.from_path(tiny_bundle, tta=1).predict_files(files)
    streamed = pd.read_csv(tmp_path / "p.csv", dtype={"image_id": str})
    assert list(streamed.columns) == list(direct.columns)
    np.testing.assert_allclose(_sorted(streamed).iloc[:, 2:].to_numpy(), _sorted(direct).iloc[:, 2:].to_numpy(),
                               atol=2e-6)


def test_resume_after_a_kill_finishes_the_rest_once(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out)]) == 0
    whole = pd.read_csv(out, dtype={"image_id": str})
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:17])  # four rows and half of the fifth: a job killed mid-write
    capsys.readouterr()
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                 "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "7 predictions written" in printed and "4 already there" in printed
    resumed = pd.read_csv(out, dtype={"image_id": str})
    assert len(resumed) == 11 and resumed.image_id.is_unique
    pd.testing.assert_frame_equal(_sorted(resumed), _sorted(whole))
    # Without --resume the file is replaced, not appended to.
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 11


def test_resume_refuses_a_file_of_another_bundle(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    pd.DataFrame({"image_id": ["a"], "pred_label": ["x"], "prob_x": [1.0]}).to_csv(out, index=False)
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                 "--resume"]) == 2
    assert "not this bundle's" in capsys.readouterr().err


def test_two_torchrun_processes_write_shards_that_make_the_whole(tiny_bundle, folder, tmp_path):
    whole = tmp_path / "whole.csv"
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(whole)]) == 0
    out = tmp_path / "sharded.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "pipelines.cli", "predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
               "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    parts = [tmp_path / f"sharded.rank{k}-of-2.csv" for k in range(2)]
    tables = [pd.read_csv(p, dtype={"image_id": str}) for p in parts]
    assert all(len(t) for t in tables) and not set(tables[0].image_id) & set(tables[1].image_id)
    merged = _sorted(pd.concat(tables))
    expected = _sorted(pd.read_csv(whole, dtype={"image_id": str}))
    pd.testing.assert_frame_equal(merged, expected)


def test_explicit_shard_takes_every_nth_file(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                 "--shard", "1/3"]) == 0
    files = sorted(p for p in folder.iterdir())[1::3]
    got = pd.read_csv(tmp_path / "p.rank1-of-3.csv", dtype={"image_id": str})
    assert set(got.image_id) == {p.stem for p in files if p.name != "broken.jpg"}
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                 "--shard", "3/3"]) == 2
    assert "expected 0 <= K < N" in capsys.readouterr().err
