"""Does a synthetic set help? The parts of a paired efficacy study that do not depend on how the arms are trained:
which classes are rare, a class-stratified subsample of N real training images, the "real only" and "real +
synthetic" manifests (the same real rows, byte for byte; only the training split grows), and the paired change
between two models' predictions on the same test rows, rare-class recall included.

`benchmarks/synthetic_efficacy.py` runs the study on the full data with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from pipelines.manifest import append_train_rows, write_manifest

__all__ = [
    "ARMS",
    "ARM_DIRS",
    "MIN_PER_CLASS",
    "REAL_ONLY",
    "WITH_SYNTHETIC",
    "build_arm_manifests",
    "paired_change",
    "paired_recall_change",
    "rare_classes_of",
    "stratified_quotas",
    "subsample_train",
]

REAL_ONLY, WITH_SYNTHETIC = "real only", "real + synthetic"
ARMS = (REAL_ONLY, WITH_SYNTHETIC)
ARM_DIRS = {REAL_ONLY: "real_only", WITH_SYNTHETIC: "real_plus_synthetic"}
MIN_PER_CLASS = 2  # pixel-space SMOTE interpolates between two images of a class; a subsample keeps this many


def rare_classes_of(manifest: pd.DataFrame, explicit: Sequence[str] | None = None) -> list[str]:
    """The classes synthetic images are added to: `explicit`, or those with fewer training images than the median."""
    counts = manifest.loc[manifest.split == "train", "label"].value_counts()
    if explicit:
        unknown = [c for c in explicit if c not in counts.index]
        if unknown:
            raise ValueError(f"rare classes {unknown} have no training images; the classes are {sorted(counts.index)}")
        return sorted(set(explicit))
    median = float(np.median(counts.to_numpy()))
    rare = sorted(str(c) for c, n in counts.items() if n < median)
    if not rare:
        raise ValueError(f"no class has fewer training images than the median ({median:g}); name the rare classes "
                         "explicitly")
    return rare


def stratified_quotas(counts: dict[str, int], n: int, min_per_class: int = MIN_PER_CLASS) -> dict[str, int]:
    """Images per class for a subsample of `n`: proportional (largest remainder), at least `min_per_class` each."""
    total = sum(counts.values())
    if not 0 < n <= total:
        raise ValueError(f"a subsample of {n} real training images is not between 1 and the {total} there are")
    floor = {c: min(k, min_per_class) for c, k in counts.items()}
    if sum(floor.values()) > n:
        raise ValueError(f"a subsample of {n} real training images is too small to keep {min_per_class} images of "
                         f"each of the {len(counts)} classes; use at least {sum(floor.values())}")
    share = {c: n * k / total for c, k in counts.items()}
    quota = {c: max(floor[c], min(counts[c], math.floor(share[c]))) for c in counts}
    # Hand out the rest by largest remainder (ties by class name), shrink the largest quotas if the floor overshot.
    order = sorted(counts, key=lambda c: (-(share[c] - math.floor(share[c])), c))
    while sum(quota.values()) < n:
        for c in order:
            if sum(quota.values()) < n and quota[c] < counts[c]:
                quota[c] += 1
    while sum(quota.values()) > n:
        c = max((c for c in counts if quota[c] > floor[c]), key=lambda c: (quota[c] - share[c], c))
        quota[c] -= 1
    return quota


def subsample_train(manifest: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """The manifest with its real training rows cut to a class-stratified random `n` (None: all); other rows as given.

    Each row gets one random key from `seed`, and each class keeps its rows with the smallest keys, so a smaller N is
    (up to rounding of the quotas) a subset of a larger one and every arm at one N sees exactly the same rows.
    """
    train = (manifest.split == "train").to_numpy()
    if n is None:
        return manifest.reset_index(drop=True)
    labels = manifest.label.astype(str).to_numpy()
    counts = {str(c): int(k) for c, k in pd.Series(labels[train]).value_counts().sort_index().items()}
    quota = stratified_quotas(counts, n)
    keys = np.random.default_rng(seed).random(len(manifest))
    keep = ~train
    for label, k in quota.items():
        rows = np.flatnonzero(train & (labels == label))
        keep[rows[np.argsort(keys[rows], kind="stable")[:k]]] = True
    return manifest[keep].reset_index(drop=True)


def build_arm_manifests(manifest: pd.DataFrame, synthetic: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write the "real only" manifest and the "real + synthetic" one (the same rows, then the synthetic rows appended
    to the training split) under `out_dir`; returns {arm: manifest path}.

    The synthetic rows keep only the real manifest's columns (their provenance goes to `synthetic_rows.csv`), so
    every real row of the two files is the same line, byte for byte.
    """
    out_dir = Path(out_dir)
    bad = synthetic[(synthetic.split != "train") | (synthetic.source != "synthetic")]
    if len(bad):
        raise ValueError(f"synthetic row '{bad.image_id.iloc[0]}' has split={bad.split.iloc[0]!r}, "
                         f"source={bad.source.iloc[0]!r}; expected split=train, source=synthetic")
    unknown = sorted(set(synthetic.label) - set(manifest.label))
    if unknown:
        raise ValueError(f"synthetic classes {unknown} are not classes of the real data "
                         f"({sorted(set(manifest.label))})")
    if (manifest.source != "real").any():
        raise ValueError("the real manifest already holds synthetic rows; expected real rows only")
    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic.to_csv(out_dir / "synthetic_rows.csv", index=False)
    added = synthetic[[c for c in manifest.columns if c in synthetic.columns]]
    if "malignant" in manifest.columns:
        by_label = manifest.drop_duplicates("label").set_index("label")["malignant"]
        added = added.assign(malignant=[by_label[label] for label in added.label])
    paths = {REAL_ONLY: write_manifest(manifest, out_dir / ARM_DIRS[REAL_ONLY] / "manifest.csv")}
    paths[WITH_SYNTHETIC] = write_manifest(append_train_rows(manifest, added)[list(manifest.columns)],
                                           out_dir / ARM_DIRS[WITH_SYNTHETIC] / "manifest.csv")
    return paths


def paired_recall_change(y_true: Sequence[int], probs_ref: np.ndarray, probs_new: np.ndarray,
                         class_names: Sequence[str], classes: Sequence[str], n_boot: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Change (new - reference) in each of `classes`' recall with a paired percentile bootstrap interval, on the
    resamples `pipelines.evaluation.paired_bootstrap_delta` uses for the same seed (stratified by class); a class
    without test cases is left out. Per class: delta, low, high and support (its test cases)."""
    from pipelines.evaluation import stratified_bootstrap_indices

    y = np.asarray(y_true)
    names = list(class_names)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not among the predicted classes {names}")
    probs = {side: np.asarray(p) for side, p in (("reference", probs_ref), ("new", probs_new))}
    for side, p in probs.items():
        if p.shape != (len(y), len(names)):
            raise ValueError(f"{side} probabilities of shape {p.shape}; expected ({len(y)}, {len(names)}), one row "
                             "per test case and one column per class")
    idx = stratified_bootstrap_indices(y, n_boot, seed)
    right = {side: p.argmax(axis=1) == y for side, p in probs.items()}
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name in classes:
        rows = np.flatnonzero(y == names.index(name))
        if not len(rows):
            continue
        deltas = right["new"][idx[:, rows]].mean(axis=1) - right["reference"][idx[:, rows]].mean(axis=1)
        low, high = np.percentile(deltas, [tail, 100 - tail])
        out[name] = {"delta": float(right["new"][rows].mean() - right["reference"][rows].mean()),
                     "low": float(low), "high": float(high), "support": int(len(rows))}
    return out


def paired_change(y_true: Sequence[int], probs_ref: np.ndarray, probs_new: np.ndarray, class_names: Sequence[str],
                  malignant_classes: Sequence[str], rare: Sequence[str], n_boot: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> dict[str, Any]:
    """Change (new - reference) on the same test cases with paired, class-stratified bootstrap intervals: balanced
    accuracy and malignant AUC (`paired_bootstrap_delta`), each rare class's recall (`paired_recall_change`, the
    same resamples) under "recall", and the bootstrap's settings under "bootstrap"."""
    from pipelines.evaluation import paired_bootstrap_delta

    change: dict[str, Any] = paired_bootstrap_delta(y_true, probs_ref, probs_new, class_names, malignant_classes,
                                                    n_boot, seed, confidence)
    change["recall"] = paired_recall_change(y_true, probs_ref, probs_new, class_names, rare, n_boot, seed, confidence)
    change["bootstrap"] = {"method": "paired percentile bootstrap, stratified by class", "n_boot": int(n_boot),
                           "seed": int(seed), "confidence": confidence}
    return change
