"""The paired synthetic-efficacy study's library parts: rare classes, the stratified N-image subsample, the two arms'
manifests (the same real rows byte for byte; only `train` grows), the per-class draw from a synthetic folder, and
the paired change with rare-class recall."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.manifest import grouped_split, ingest_ham10000
from pipelines.synthesis import (
    MIN_PER_CLASS,
    REAL_ONLY,
    WITH_SYNTHETIC,
    build_arm_manifests,
    paired_change,
    rare_classes_of,
    sample_per_class,
    subsample_train,
    synthetic_rows_from_folder,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "ham10000_sample"
PER_CLASS = 3
N_REAL = 60


@pytest.fixture(scope="module")
def split() -> pd.DataFrame:
    return grouped_split(ingest_ham10000(SAMPLE), 0.15, 0.15, seed=0)


def _folder(root: Path, counts: dict[str, int], size: int = 32) -> Path:
    """`root/<class>/<image>.png` with `counts[class]` distinct images of `size` px."""
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size, size), (i * 40, 0, 0)).save(root / label / f"{label}{i}.png")
    return root


def _rows(path: Path) -> tuple[str, list[str], list[dict]]:
    """(header line, data lines as written, parsed rows) of a manifest CSV."""
    lines = path.read_text().splitlines()
    return lines[0], lines[1:], list(csv.DictReader(lines))


def test_rare_classes_are_below_the_median_or_named(split: pd.DataFrame) -> None:
    counts = split[split.split == "train"].label.value_counts()
    rare = rare_classes_of(split)
    assert rare and all(counts[c] < counts.median() for c in rare)
    assert all(counts[c] >= counts.median() for c in set(counts.index) - set(rare))
    assert rare_classes_of(split, ["vasc", "df"]) == ["df", "vasc"]
    with pytest.raises(ValueError, match="'zzz'"):
        rare_classes_of(split, ["zzz"])


def test_subsample_is_stratified_repeatable_and_leaves_val_test_alone(split: pd.DataFrame) -> None:
    real = subsample_train(split, N_REAL, seed=0)
    train = real[real.split == "train"]
    assert len(train) == N_REAL
    assert train.label.value_counts().min() >= MIN_PER_CLASS and train.label.nunique() == split.label.nunique()
    full = split[split.split == "train"].label.value_counts(normalize=True)
    assert (train.label.value_counts(normalize=True) - full).abs().max() < 0.1
    pd.testing.assert_frame_equal(real[real.split != "train"].reset_index(drop=True),
                                  split[split.split != "train"].reset_index(drop=True))
    assert subsample_train(split, N_REAL, seed=0).equals(real)
    assert not subsample_train(split, N_REAL, seed=1).equals(real)
    larger = subsample_train(split, 2 * N_REAL, seed=0)
    assert set(train.image_id) <= set(larger[larger.split == "train"].image_id)
    assert subsample_train(split, None).equals(split.reset_index(drop=True))
    with pytest.raises(ValueError, match="subsample of 5 real training images is too small"):
        subsample_train(split, 5)


def test_arms_have_byte_identical_real_rows_and_only_train_grows(split: pd.DataFrame, tmp_path: Path) -> None:
    rare = rare_classes_of(split)
    real = subsample_train(split, N_REAL, seed=0)
    folder = _folder(tmp_path / "synthetic", {c: PER_CLASS + 1 for c in rare})
    synthetic = sample_per_class(synthetic_rows_from_folder(folder), rare, PER_CLASS, seed=0)
    paths = build_arm_manifests(real, synthetic, tmp_path / "arms")

    header_real, lines_real, rows_real = _rows(paths[REAL_ONLY])
    header_syn, lines_syn, rows_syn = _rows(paths[WITH_SYNTHETIC])
    assert header_real == header_syn
    # Every real row (train, val and test) is the same line, byte for byte, in the same order.
    real_in_syn = [line for line, row in zip(lines_syn, rows_syn, strict=True) if row["source"] == "real"]
    assert real_in_syn == lines_real and len(lines_real) == len(real)
    for name in ("val", "test"):
        wanted = [line for line, row in zip(lines_real, rows_real, strict=True) if row["split"] == name]
        got = [line for line, row in zip(lines_syn, rows_syn, strict=True) if row["split"] == name]
        assert got == wanted and wanted
    # What is added: exactly the synthetic rows, all split=train, only in the rare classes, PER_CLASS each.
    added = [row for row in rows_syn if row["source"] == "synthetic"]
    assert len(rows_syn) - len(rows_real) == len(added) == PER_CLASS * len(rare)
    assert all(row["split"] == "train" for row in added)
    assert pd.Series([row["label"] for row in added]).value_counts().to_dict() == {c: PER_CLASS for c in rare}
    assert all(Image.open(row["path"]).size == (32, 32) for row in added)
    assert (tmp_path / "arms" / "synthetic_rows.csv").is_file()
    with pytest.raises(ValueError, match="expected split=train, source=synthetic"):
        build_arm_manifests(real, synthetic.assign(split="val"), tmp_path / "bad")


def test_paired_change_of_identical_and_of_better_predictions() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    names, malignant, rare = ["bcc", "df", "nv"], ["bcc"], ["df"]
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), np.where(y == 1, 2, y)] = 0.8  # every df case called nv
    same = paired_change(y, probs, probs.copy(), names, malignant, rare, n_boot=100)
    assert same["balanced_accuracy"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    assert same["recall"]["df"]["delta"] == 0.0
    assert same["bootstrap"]["n_boot"] == 100
    fixed = probs.copy()
    fixed[y == 1] = [0.1, 0.8, 0.1]
    better = paired_change(y, probs, fixed, names, malignant, rare, n_boot=100)
    assert better["recall"]["df"] == {"delta": 1.0, "low": 1.0, "high": 1.0, "support": 3}
    accuracy = better["balanced_accuracy"]
    assert accuracy["delta"] == pytest.approx(1 / 3) and accuracy["low"] <= accuracy["delta"] <= accuracy["high"]
    with pytest.raises(ValueError, match="not among the predicted classes"):
        paired_change(y, probs, fixed, names, malignant, ["vasc"], n_boot=10)


def test_folder_draw_is_per_class_repeatable_and_refuses_too_few(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"df": 4, "vasc": 2, "other": 1})
    rows = synthetic_rows_from_folder(folder)
    drawn = sample_per_class(rows, ["df", "vasc"], 2, seed=0)
    assert drawn.label.value_counts().to_dict() == {"df": 2, "vasc": 2}
    assert (drawn.source == "synthetic").all() and (drawn.split == "train").all()
    assert sample_per_class(rows, ["df", "vasc"], 2, seed=0).equals(drawn)
    draws = {tuple(sample_per_class(rows, ["df"], 2, seed=s).path) for s in range(10)}
    assert len(draws) > 1  # the seed decides which df images are drawn
    with pytest.raises(ValueError, match=r"fewer than 3 images for classes \{'vasc': 2\}"):
        sample_per_class(rows, ["df", "vasc"], 3, seed=0)
