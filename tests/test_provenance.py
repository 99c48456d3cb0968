"""Run provenance: stage markers that record what produced them, re-runs of what changed, config history,
run-relative paths, the training card's hyper-parameters, and grouped k-fold cross-validation."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.cli import main
from pipelines.provenance import file_sha256, git_commit

TINY = {
    "model": {"name": "small-cnn", "img_size": 32, "pretrained": False, "kwargs": {"widths": [8]}},
    "training": {"epochs": 1, "batch_size": 16, "device": "cpu", "tta": 1},
}


def _write_config(path: Path, manifest: Path, **sections) -> Path:
    config = {"data": {"format": "manifest", "manifest": str(manifest)}, **TINY, **sections}
    path.write_text(yaml.safe_dump(config))
    return path


def _card(run_dir: Path) -> dict:
    return json.loads((run_dir / "bundle" / "card.json").read_text())


def _marker(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / f"{stage}.json").read_text())


def _stamps(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def finished_run(small_manifest, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, config file) of a finished ingest + train run, made from its own working directory with a
    relative --run-dir."""
    base = tmp_path_factory.mktemp("provenance")
    config = _write_config(base / "config_in.yaml", small_manifest)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["run", "--config", str(config), "--run-dir", "run"]) == 0
    finally:
        os.chdir(cwd)
    return base / "run", config


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A copy of the finished run, used from another working directory."""
    run_dir, config = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    monkeypatch.chdir(tmp_path)
    return copy, config


def test_markers_record_config_inputs_code_and_run_relative_paths(finished_run, small_manifest):
    run_dir, _ = finished_run
    ingest, train = _marker(run_dir, "ingest"), _marker(run_dir, "train")
    assert ingest["outputs"]["manifest"] == "manifest.csv"  # not 'run/manifest.csv' (relative to the working directory)
    assert train["outputs"]["bundle"] == "bundle"
    prov = train["provenance"]
    assert prov["config"]["training"]["epochs"] == 1 and set(prov["config_sha256"]) == {"data", "model", "training"}
    assert prov["inputs"]["manifest"] == {"path": "manifest.csv", "sha256": file_sha256(run_dir / "manifest.csv")}
    assert ingest["provenance"]["inputs"]["source"]["sha256"] == file_sha256(small_manifest)
    assert prov["code"]["lesionlab"] and prov["attempt"] == 1
    assert yaml.safe_load((run_dir / "configs" / "attempt-1.yaml").read_text())["training"]["epochs"] == 1
    assert (run_dir / "config.yaml").read_text() == (run_dir / "configs" / "attempt-1.yaml").read_text()


def test_unchanged_rerun_skips_every_stage_and_keeps_the_config(run_copy, caplog):
    copy, config = run_copy
    stamps, described = _stamps(copy), (copy / "config.yaml").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="pipelines.run")
    assert main(["run", "--config", str(config), "--run-dir", str(copy)]) == 0
    assert _stamps(copy) == stamps
    assert (copy / "config.yaml").stat().st_mtime_ns == described
    assert sorted(p.name for p in (copy / "configs").iterdir()) == ["attempt-1.yaml"]
    assert "stage train: already complete with the same config and inputs, skipped" in caplog.text


def test_changed_epochs_reruns_train_from_scratch_and_keeps_the_old_config(run_copy, caplog):
    copy, config = run_copy
    stamps = _stamps(copy)
    caplog.set_level(logging.INFO, logger="pipelines.run")
    assert main(["run", "--config", str(config), "--run-dir", str(copy), "training.epochs=2"]) == 0
    after = _stamps(copy)
    assert after["ingest.json"] == stamps["ingest.json"] and after["train.json"] != stamps["train.json"]
    assert "stage train: re-running, with every stage after it: config changed: training.epochs: 1 -> 2" in caplog.text
    card = _card(copy)
    assert card["training"]["epochs_run"] == 2 and card["training"]["epochs"] == 2  # not resumed from the 1-epoch run
    assert _marker(copy, "train")["provenance"]["attempt"] == 2
    assert yaml.safe_load((copy / "config.yaml").read_text())["training"]["epochs"] == 2
    assert yaml.safe_load((copy / "configs" / "attempt-1.yaml").read_text())["training"]["epochs"] == 1


def test_changed_split_reruns_ingest_and_every_later_stage(run_copy, caplog):
    copy, config = run_copy
    stamps = _stamps(copy)
    caplog.set_level(logging.INFO, logger="pipelines.run")
    assert main(["run", "--config", str(config), "--run-dir", str(copy), "split.seed=3"]) == 0
    after = _stamps(copy)
    assert after["ingest.json"] != stamps["ingest.json"] and after["train.json"] != stamps["train.json"]
    assert "stage ingest: re-running, with every stage after it: config changed: split.seed: 0 -> 3" in caplog.text
    assert "stage train: re-running, with every stage after it: stage 'ingest' before it ran" in caplog.text


def test_no_rerun_refuses_a_changed_stage_naming_the_field(run_copy, capsys):
    copy, config = run_copy
    stamps, described = _stamps(copy), (copy / "config.yaml").read_text()
    assert main(["run", "--config", str(config), "--run-dir", str(copy), "--no-rerun", "training.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage 'train'" in err and "training.lr: 0.001 -> 0.01" in err
    assert _stamps(copy) == stamps and (copy / "config.yaml").read_text() == described
    # unchanged: --no-rerun reuses everything
    assert main(["run", "--config", str(config), "--run-dir", str(copy), "--no-rerun"]) == 0


def test_marker_without_provenance_is_unknown_and_re_run(run_copy, caplog, capsys):
    copy, config = run_copy
    marker = copy / "stages" / "train.json"
    legacy = {k: v for k, v in json.loads(marker.read_text()).items() if k != "provenance"}
    marker.write_text(json.dumps(legacy))
    assert main(["run", "--config", str(config), "--run-dir", str(copy), "--no-rerun"]) == 2
    assert "unknown provenance" in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="pipelines.run")
    assert main(["run", "--config", str(config), "--run-dir", str(copy)]) == 0
    assert "stage train: re-running" in caplog.text and "unknown provenance" in caplog.text
    assert "provenance" in json.loads(marker.read_text())


def test_copied_run_resumes_with_its_own_files(finished_run, run_copy):
    original, _ = finished_run
    copy, config = run_copy
    original_weights = (original / "bundle" / "weights.safetensors").read_bytes()
    # The copy was killed during training, and its manifest differs from the original's.
    (copy / "stages" / "train.json").unlink()
    shutil.rmtree(copy / "bundle")
    manifest = pd.read_csv(copy / "manifest.csv", keep_default_na=False)
    manifest = manifest.drop(manifest[manifest.split == "train"].groupby("label").head(2).index)
    manifest.to_csv(copy / "manifest.csv", index=False)
    assert main(["run", "--config", str(config), "--run-dir", str(copy)]) == 0
    card = _card(copy)
    assert card["manifest_sha256"] == file_sha256(copy / "manifest.csv")
    assert card["training"]["images"] == (manifest.split == "train").sum()
    assert (original / "bundle" / "weights.safetensors").read_bytes() == original_weights


def test_train_writes_its_config_and_the_card_has_every_hyper_parameter(small_manifest, tmp_path):
    config = _write_config(tmp_path / "c.yaml", small_manifest)
    run_dir = tmp_path / "train"
    argv = ["train", "--config", str(config), "--run-dir", str(run_dir), "--manifest", str(small_manifest)]
    assert main(argv) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["epochs"] == 1
    card = _card(run_dir)
    training = card["training"]
    for key in ("lr", "weight_decay", "epochs", "epochs_planned", "epochs_run", "batch_size", "warmup_epochs",
                "scheduler", "optimizer", "sampler", "loss", "ema_decay", "mixup_alpha", "cutmix_alpha", "mix_prob",
                "mixed_precision", "img_size", "seed", "patience", "label_smoothing", "num_processes"):
        assert key in training, key
    assert training["warmup_epochs"] == 1.0 and training["img_size"] == 32 and training["epochs"] == 1
    assert card["code_version"]["lesionlab"] and "git_commit" in card["code_version"]
    # Training again with more epochs starts afresh instead of resuming the finished 1-epoch checkpoints.
    assert main(argv + ["training.epochs=2"]) == 0
    assert _card(run_dir)["training"]["epochs_run"] == 2
    assert yaml.safe_load((run_dir / "configs" / "attempt-1.yaml").read_text())["training"]["epochs"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["epochs"] == 2


def test_cv_trains_each_grouped_fold_and_writes_mean_and_spread(ham_manifest, tmp_path, capsys):
    rows = ham_manifest.drop_duplicates("group")
    rows = pd.concat([rows[rows.label == label].head(12) for label in ("nv", "bkl", "mel", "bcc")])
    rows = rows.assign(split="")
    manifest = tmp_path / "cv_manifest.csv"
    rows.to_csv(manifest, index=False)
    config = _write_config(tmp_path / "c.yaml", manifest, split={"val_fraction": 0.3})
    run_dir = tmp_path / "cv"
    assert main(["cv", "--config", str(config), "--folds", "2", "--run-dir", str(run_dir),
                 "--manifest", str(manifest)]) == 0
    result = json.loads((run_dir / "cv.json").read_text())
    folds = result["per_fold"]
    assert len(folds) == 2 and sum(f["test"] for f in folds) == len(rows)
    tests = [set(pd.read_csv(run_dir / f"fold_{i}" / "manifest.csv").query("split == 'test'").group) for i in (0, 1)]
    assert not tests[0] & tests[1] and tests[0] | tests[1] == set(rows.group)
    scores = [f["balanced_accuracy"] for f in folds]
    assert all(0 <= s <= 1 for s in scores)
    assert result["summary"]["balanced_accuracy"]["mean"] == pytest.approx(sum(scores) / 2)
    assert result["summary"]["balanced_accuracy"]["sd"] == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    assert "| mean |" in (run_dir / "cv.md").read_text()
    assert "cv.md" in capsys.readouterr().out


def test_git_commit_is_read_without_git_and_is_none_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) is None
    sha = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")
    assert git_commit(tmp_path) == sha
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(sha.replace("0", "f") + "\n")
    assert git_commit(tmp_path) == sha.replace("0", "f")


def test_mil_train_follows_a_changed_method_and_records_each_attempt(tmp_path):
    """`lesionlab mil-train` used to resume the finished checkpoints whatever the config said."""
    from tests.test_mil import _mil_config

    config = _mil_config(tmp_path / "run", encoder="small-cnn").model_dump(mode="json")
    config["training"]["epochs"] = 1
    path = tmp_path / "mil.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["mil-train", "--config", str(path), "--run-dir", str(run_dir)]) == 0
    assert _card(run_dir)["mil"]["method"] == "scmil"
    # `lesionlab train` with a `mil:` config runs the same stage
    assert main(["train", "--config", str(path), "--run-dir", str(run_dir), "mil.method=abmil"]) == 0
    assert _card(run_dir)["mil"]["method"] == "abmil"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["mil"]["method"] == "abmil"
    attempts = sorted((run_dir / "configs").glob("attempt-*.yaml"))
    assert [yaml.safe_load(a.read_text())["mil"].get("method", "scmil") for a in attempts] == ["scmil", "abmil"]


def test_train_on_a_manifest_refuses_a_misspelt_malignant_class(small_manifest, tmp_path, capsys):
    config = _write_config(tmp_path / "c.yaml", small_manifest)
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--manifest",
                 str(small_manifest), "data.malignant_classes=[mel,bcc,akeic]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'akeic'" in err and err.count("\n") == 1
