"""`lesionlab` end to end: predict (with a corrupt file), evaluate, run/resume, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines.calibration import calibrated_probs
from pipelines.cli import main
from pipelines.prediction import Predictor
from tests.conftest import HAM_SAMPLE, REPO


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:5]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.docx").write_bytes(b"PK\x03\x04 a word file")
    return folder


def test_predict_writes_one_row_per_image_and_reports_bad_files(tiny_bundle, image_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", "--bundle", str(tiny_bundle), "--images", str(image_folder), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert list(table.columns) == ["image_id", "pred_label", *[f"prob_{c}" for c in classes], "prob_malignant"]
    assert sorted(table.image_id) == sorted(p.stem for p in (HAM_SAMPLE / "images").glob("*.jpg"))[:5]
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(table.prob_malignant, table[["prob_mel", "prob_bcc", "prob_akiec"]].sum(1), atol=1e-5)
    assert (table.pred_label == np.array(classes)[probs.argmax(1)]).all()
    err = capsys.readouterr().err
    for name in ("broken.jpg", "empty.png", "notes.docx"):
        assert name in err


def test_predict_matches_the_python_predictor(tiny_bundle, image_folder, tmp_path):
    out = tmp_path / "preds.csv"
    main(["predict", "--bundle", str(tiny_bundle), "--images", str(image_folder), "--out", str(out)])
    table = pd.read_csv(out).set_index("image_id")
    files = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:5]
    direct, _ = Predictor.from_path(tiny_bundle).predict_files(files)
    assert np.allclose(direct.set_index("image_id").loc[table.index, "prob_mel"], table.prob_mel, atol=1e-5)


def test_predict_from_csv_list(tiny_bundle, tmp_path):
    files = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:3]
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(f) for f in files]}).to_csv(listing, index=False)
    assert (
        main(["predict", "--bundle", str(tiny_bundle), "--images", str(listing), "--out", str(tmp_path / "p.csv")]) == 0
    )
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["predict", "--bundle", "/nonexistent/bundle", "--images", ".", "--out", "x.csv"], "not a model bundle"),
        (["evaluate", "--bundle", "BUNDLE", "--data", "/nonexistent/data"], "neither a manifest"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["train", "--config", "configs/demo.yaml", "training.epochs=many"], "training.epochs"),
        (
            ["train", "--config", "configs/demo.yaml", "model.name=resnet", "data.root=data/ham10000_sample"],
            "unknown model 'resnet'",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [a.replace("BUNDLE", str(tiny_bundle)) for a in argv]
    if argv[0] == "train":
        argv += ["--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_class_in_evaluation_data_is_named(tiny_bundle, small_manifest, tmp_path, capsys):
    df = pd.read_csv(small_manifest)
    df.loc[df.split == "test", "label"] = "melanoma_typo"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--data", str(bad)]) == 2
    assert "melanoma_typo" in capsys.readouterr().err


def test_evaluate_writes_report(tiny_bundle, small_manifest, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--out", str(out)]) == 0
    assert "malignant auc" in (out / "report.md").read_text()
    assert len(pd.read_csv(out / "predictions.csv")) == 28  # 4 test images x 7 classes


def test_run_skips_completed_stages(small_manifest, tmp_path):
    import yaml

    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"format": "manifest", "manifest": str(small_manifest)},
        "model": {"name": "small-cnn", "img_size": 32, "pretrained": False, "kwargs": {"widths": [8]}},
        "training": {"epochs": 1, "batch_size": 16, "device": "cpu"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0
    marker = tmp_path / "run" / "stages" / "train.json"
    stamp = marker.stat().st_mtime_ns
    weights = (tmp_path / "run" / "bundle" / "weights.safetensors").read_bytes()
    assert main(["run", "--config", str(path)]) == 0
    assert marker.stat().st_mtime_ns == stamp
    assert (tmp_path / "run" / "bundle" / "weights.safetensors").read_bytes() == weights


def test_console_script_help_is_fast_to_reach():
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    for command in ("ingest", "run", "train", "evaluate", "predict", "serve"):
        assert command in done.stdout


def test_predict_tta_flag_overrides_the_bundle_setting(tiny_bundle, image_folder, tmp_path, capsys):
    one, eight = tmp_path / "tta1.csv", tmp_path / "tta8.csv"
    base = ["predict", "--bundle", str(tiny_bundle), "--images", str(image_folder)]
    assert main([*base, "--out", str(one), "--tta", "1"]) == 0
    assert main([*base, "--out", str(eight)]) == 0  # the bundle's own setting: 8 views
    files = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:5]
    direct, _ = Predictor.from_path(tiny_bundle, tta=1).predict_files(files)
    table = pd.read_csv(one).set_index("image_id")
    assert np.allclose(direct.set_index("image_id").loc[table.index, "prob_mel"], table.prob_mel, atol=1e-5)
    assert not np.allclose(pd.read_csv(eight).prob_mel, pd.read_csv(one).prob_mel, atol=1e-7)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(one), "--tta", "4"])
    assert "invalid choice" in capsys.readouterr().err


def test_ensemble_command_writes_a_scored_ensemble_bundle(tiny_bundle, small_manifest, tmp_path, capsys):
    import json

    second = tmp_path / "second"
    shutil.copytree(tiny_bundle, second)
    card = json.loads((second / "card.json").read_text())
    card["calibration"] = {"method": "temperature", "temperature": 0.5}
    (second / "card.json").write_text(json.dumps(card))
    out = tmp_path / "ensemble"
    argv = ["ensemble", "--members", str(tiny_bundle), str(second), "--data", str(small_manifest), "--out", str(out)]
    assert main(argv) == 0
    made = json.loads((out / "card.json").read_text())
    assert made["ensemble"]["members"] == ["member_0", "member_1"]
    assert {"validation", "test"} <= set(made["metrics"]) and made["operating_threshold"] is not None
    files = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:3]
    got, _ = Predictor.from_path(out).predict_files(files)
    one, _ = Predictor.from_path(tiny_bundle).predict_files(files)
    two, _ = Predictor.from_path(second).predict_files(files)
    # The mean of the calibrated members, then the ensemble's own temperature (fitted on validation) on its log.
    calibration = made["calibration"]
    assert calibration["method"] == "temperature" and "mean of the members" in calibration["fitted_on"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    columns = [f"prob_{c}" for c in made["class_names"]]
    mean = (one[columns].to_numpy() + two[columns].to_numpy()) / 2
    expected = calibrated_probs(np.log(mean), calibration)
    assert np.allclose(got[columns].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(got[columns].to_numpy(), mean, atol=1e-3)  # the temperature did change something
    assert main(["ensemble", "--members", str(tiny_bundle), "--data", str(small_manifest), "--out",
                 str(tmp_path / "x")]) == 2
    assert "at least 2 member bundles" in capsys.readouterr().err
