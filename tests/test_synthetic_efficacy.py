"""The synthetic-efficacy benchmark's harness: both arms share the real rows and the seed, only `train` grows."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "ham10000_sample"
PER_CLASS = 3
N_REAL = 60


def _benchmark():
    spec = importlib.util.spec_from_file_location("synthetic_efficacy", ROOT / "benchmarks" / "synthetic_efficacy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions at 32 px: thread hand-off on a busy 2-core machine costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split() -> pd.DataFrame:
    return bench.load_real_split(SAMPLE)


@pytest.fixture(scope="module")
def study(split: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """N=60 real training images, 3 pixel-SMOTE images per rare class, both arms trained 1 epoch, the record."""
    work = tmp_path_factory.mktemp("efficacy")
    rare = bench.rare_classes_of(split)
    real = bench.subsample_train(split, N_REAL, seed=0)
    synthetic = bench.synthetic_rows("smote", real, rare, PER_CLASS, work / "synthetic", seed=0, size=32)
    paths = bench.build_arm_manifests(real, synthetic, work)
    settings = bench.ArmSettings(img_size=32, widths=(8, 16), epochs=1, batch_size=16)
    arms = {arm: bench.run_arm(arm, paths[arm], work / "seed0" / bench.ARM_DIRS[arm], 0, settings,
                               work / "image_cache") for arm in bench.ARMS}
    pair = bench.pair_record(str(N_REAL), 0, arms, rare, n_boot=50)
    meta = {"date": "2026-01-01", "command": "pytest", "machine": "test", "data": str(SAMPLE),
            "real_images": len(split), "split_seed": 0, "subsample_seed": 0, "synthetic_seed": 0, "source": "smote",
            "synthetic_per_class": PER_CLASS, "rare_classes": rare, "malignant_classes": ["mel", "bcc", "akiec"],
            "seeds": [0], "bootstrap": 50, "confidence": 0.95, "settings": bench.asdict(settings)}
    record = bench.summarise([pair], meta, work / "record")
    return {"work": work, "rare": rare, "real": real, "paths": paths, "arms": arms, "record": record}


def _rows(path: Path) -> tuple[str, list[str], list[dict]]:
    """(header line, data lines as written, parsed rows) of a manifest CSV."""
    lines = path.read_text().splitlines()
    return lines[0], lines[1:], list(csv.DictReader(lines))


def test_rare_classes_are_below_the_median_or_named(split: pd.DataFrame) -> None:
    counts = split[split.split == "train"].label.value_counts()
    rare = bench.rare_classes_of(split)
    assert rare and all(counts[c] < counts.median() for c in rare)
    assert all(counts[c] >= counts.median() for c in set(counts.index) - set(rare))
    assert bench.rare_classes_of(split, ["vasc", "df"]) == ["df", "vasc"]
    with pytest.raises(ValueError, match="'zzz'"):
        bench.rare_classes_of(split, ["zzz"])


def test_subsample_is_stratified_repeatable_and_leaves_val_test_alone(split: pd.DataFrame) -> None:
    real = bench.subsample_train(split, N_REAL, seed=0)
    train = real[real.split == "train"]
    assert len(train) == N_REAL
    assert train.label.value_counts().min() >= bench.MIN_PER_CLASS and train.label.nunique() == split.label.nunique()
    full = split[split.split == "train"].label.value_counts(normalize=True)
    assert (train.label.value_counts(normalize=True) - full).abs().max() < 0.1
    pd.testing.assert_frame_equal(real[real.split != "train"].reset_index(drop=True),
                                  split[split.split != "train"].reset_index(drop=True))
    assert bench.subsample_train(split, N_REAL, seed=0).equals(real)
    assert not bench.subsample_train(split, N_REAL, seed=1).equals(real)
    larger = bench.subsample_train(split, 2 * N_REAL, seed=0)
    assert set(train.image_id) <= set(larger[larger.split == "train"].image_id)
    assert bench.subsample_train(split, None).equals(split.reset_index(drop=True))
    with pytest.raises(ValueError, match="--n-real 5 is too small"):
        bench.subsample_train(split, 5)


def test_arms_have_byte_identical_real_rows_and_only_train_grows(study: dict) -> None:
    header_real, lines_real, rows_real = _rows(study["paths"][bench.REAL])
    header_syn, lines_syn, rows_syn = _rows(study["paths"][bench.SYNTHETIC])
    assert header_real == header_syn
    # Every real row (train, val and test) is the same line, byte for byte, in the same order.
    real_in_syn = [line for line, row in zip(lines_syn, rows_syn, strict=True) if row["source"] == "real"]
    assert real_in_syn == lines_real
    for split in ("val", "test"):
        wanted = [line for line, row in zip(lines_real, rows_real, strict=True) if row["split"] == split]
        got = [line for line, row in zip(lines_syn, rows_syn, strict=True) if row["split"] == split]
        assert got == wanted and wanted
    # What is added: exactly the synthetic rows, all split=train, only in the rare classes, PER_CLASS each.
    added = [row for row in rows_syn if row["source"] == "synthetic"]
    assert len(rows_syn) - len(rows_real) == len(added) == PER_CLASS * len(study["rare"])
    assert all(row["split"] == "train" for row in added)
    assert pd.Series([row["label"] for row in added]).value_counts().to_dict() == {c: PER_CLASS for c in study["rare"]}
    assert all(Image.open(row["path"]).size == (32, 32) for row in added)
    counts = {arm: study["arms"][arm]["train_counts"] for arm in bench.ARMS}
    for name, real_count in counts[bench.REAL].items():
        extra = PER_CLASS if name in study["rare"] else 0
        assert counts[bench.SYNTHETIC][name] == {"real": real_count["real"], "synthetic": extra}


def test_both_arms_train_with_one_seed_and_schedule_on_the_same_test_rows(study: dict) -> None:
    real, synthetic = (study["arms"][arm] for arm in bench.ARMS)
    assert real["training_seed"] == synthetic["training_seed"] == 0
    assert real["test_rows_sha256"] == synthetic["test_rows_sha256"]
    assert np.array_equal(real["test_labels"], synthetic["test_labels"]) and real["test_n"] > 0
    assert synthetic["train_images"] - real["train_images"] == PER_CLASS * len(study["rare"])
    configs = {arm: json.loads((Path(study["arms"][arm]["run_dir"]) / "arm_config.json").read_text())["config"]
               for arm in bench.ARMS}
    for config in configs.values():
        config.pop("run_dir")
        config["data"].pop("manifest")
    assert configs[bench.REAL] == configs[bench.SYNTHETIC]
    cards = [json.loads((Path(study["arms"][arm]["run_dir"]) / "bundle" / "card.json").read_text())
             for arm in bench.ARMS]
    assert cards[0]["training"]["seed"] == cards[1]["training"]["seed"] == 0
    assert cards[0]["training"]["epochs_run"] == cards[1]["training"]["epochs_run"] == 1


def test_record_holds_paired_intervals_and_labels_the_harness_check(study: dict) -> None:
    record = json.loads((study["work"] / "record" / "results.json").read_text())
    change = record["pairs"][0]["change"]
    for key in ("balanced_accuracy", "malignant_auc"):
        assert change[key]["low"] <= change[key]["delta"] <= change[key]["high"]
    assert set(change["recall"]) == set(study["rare"])
    for cell in change["recall"].values():
        assert {"delta", "low", "high", "support"} <= set(cell) and cell["low"] <= cell["high"]
    assert change["bootstrap"]["n_boot"] == 50
    real, synthetic = (study["arms"][arm] for arm in bench.ARMS)
    assert change["balanced_accuracy"]["delta"] == pytest.approx(synthetic["balanced_accuracy"]
                                                                 - real["balanced_accuracy"])
    pooled = record["pooled"][0]
    assert pooled["n_real"] == str(N_REAL) and pooled["seeds"] == [0]
    assert pooled["change"]["balanced_accuracy"]["mean"] == pytest.approx(change["balanced_accuracy"]["delta"])
    assert {row["arm"] for row in record["rows"]} == set(bench.ARMS)
    assert all(row["train_minutes"] >= 0 for row in record["rows"])
    assert "test_probs" not in record["rows"][0]
    assert record["harness_check"] and bench.HARNESS_CHECK in record["protocol"]
    markdown = (study["work"] / "record" / "results.md").read_text()
    assert bench.HARNESS_CHECK in markdown and "| 60 | pooled (1) |" in markdown


def test_finished_arm_is_read_back_not_retrained(study: dict) -> None:
    arm = bench.REAL
    run_dir = Path(study["arms"][arm]["run_dir"])
    weights = run_dir / "bundle" / "weights.safetensors"
    before = weights.stat().st_mtime_ns
    settings = bench.ArmSettings(img_size=32, widths=(8, 16), epochs=1, batch_size=16)
    again = bench.run_arm(arm, study["paths"][arm], run_dir, 0, settings)
    assert weights.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again["test_probs"], study["arms"][arm]["test_probs"])


def test_paired_change_of_identical_and_of_better_predictions() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    names, rare = ["bcc", "df", "nv"], ["df"]
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), np.where(y == 1, 2, y)] = 0.8  # every df case called nv
    base = {"arm": "a", "test_rows_sha256": "x", "test_labels": y, "class_names": names,
            "malignant_classes": ["bcc"], "test_probs": probs}
    same = bench.compare_arms(base, {**base, "arm": "b"}, rare, n_boot=100)
    assert same["balanced_accuracy"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    assert same["recall"]["df"]["delta"] == 0.0
    fixed = probs.copy()
    fixed[y == 1] = [0.1, 0.8, 0.1]
    better = bench.compare_arms(base, {**base, "arm": "b", "test_probs": fixed}, rare, n_boot=100)
    assert better["recall"]["df"] == {"delta": 1.0, "low": 1.0, "high": 1.0, "support": 3}
    assert better["balanced_accuracy"]["delta"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different test rows"):
        bench.compare_arms(base, {**base, "arm": "b", "test_rows_sha256": "y"}, rare)


def test_folder_source_draws_per_class_images_and_refuses_too_few(split: pd.DataFrame, tmp_path: Path) -> None:
    for label, n in (("df", 4), ("vasc", 2), ("other", 1)):
        (tmp_path / label).mkdir()
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / label / f"{label}{i}.png")
    rows = bench.synthetic_rows(f"folder:{tmp_path}", split, ["df", "vasc"], 2, tmp_path / "unused", seed=0)
    assert rows.label.value_counts().to_dict() == {"df": 2, "vasc": 2}
    assert (rows.source == "synthetic").all() and (rows.split == "train").all()
    assert bench.synthetic_rows(f"folder:{tmp_path}", split, ["df", "vasc"], 2, tmp_path, seed=0).equals(rows)
    with pytest.raises(ValueError, match=r"fewer than 3 images for rare classes \{'vasc': 2\}"):
        bench.synthetic_rows(f"folder:{tmp_path}", split, ["df", "vasc"], 3, tmp_path, seed=0)
    with pytest.raises(ValueError, match="unknown synthetic source 'gan'"):
        bench.synthetic_rows("gan", split, ["df"], 2, tmp_path)
    assert "not of FLUX" not in bench.source_label(f"folder:{tmp_path}")
