"""Stratified bootstrap intervals of a model's metrics, and paired intervals of the change between two models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from pipelines.evaluation.metrics import malignant_probability

__all__ = ["add_score_intervals", "bootstrap_intervals", "paired_bootstrap_delta", "stratified_bootstrap_indices"]

log = logging.getLogger(__name__)

_BOOTSTRAP_CHUNK = 250  # resamples scored at once: memory grows with chunk x cases, not with n_boot x cases


def _bootstrap_chunks(y_true: np.ndarray, n_boot: int, seed: int):
    """Yield (chunk, N) index arrays of a stratified bootstrap; see `stratified_bootstrap_indices`."""
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; a bootstrap needs at least 1 resample")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    for start in range(0, n_boot, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_boot - start)
        idx = np.empty((size, len(y_true)), dtype=np.int64)
        for rows in members:
            idx[:, rows] = rows[rng.integers(0, len(rows), size=(size, len(rows)))]
        yield idx


def stratified_bootstrap_indices(y_true: Sequence[int], n_boot: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n_boot, N) case indices of a bootstrap stratified by class: each resample draws, with replacement, as many
    cases of every class as it has, into that class's own positions, so `y_true[idx] == y_true` on every row and no
    resample loses a rare class."""
    return np.concatenate(list(_bootstrap_chunks(np.asarray(y_true), n_boot, seed)))


class _ResampleScorer:
    """Balanced accuracy, malignant AUC, per-class recall and sensitivity/specificity at a threshold of one set of
    predictions, on many resamples at once (vectorised; labels are fixed because the resampling is stratified)."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                 malignant_classes: Sequence[str], operating_threshold: float | None = None) -> None:
        self.correct = probs.argmax(axis=1) == y_true
        self.classes = {name: np.flatnonzero(y_true == c) for c, name in enumerate(class_names)
                        if (y_true == c).any()}
        present = [c for c in malignant_classes if c in class_names]
        y_mal = np.isin(np.asarray(class_names)[y_true], present) if present else np.zeros(len(y_true), bool)
        self.positives, self.negatives = np.flatnonzero(y_mal), np.flatnonzero(~y_mal)
        self.has_auc = bool(present) and len(self.positives) > 0 and len(self.negatives) > 0
        self.p_mal = malignant_probability(probs, class_names, present) if present else None
        self.referred = (self.p_mal >= operating_threshold) if (
            self.has_auc and operating_threshold is not None) else None

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        from scipy.stats import rankdata

        recall = {name: self.correct[idx[:, rows]].mean(axis=1) for name, rows in self.classes.items()}
        scores = {"balanced_accuracy": np.mean(list(recall.values()), axis=0),
                  **{f"recall/{name}": r for name, r in recall.items()}}
        if self.has_auc:
            # Mann-Whitney form of the ROC AUC, ties counted half: (rank sum of positives - P(P+1)/2) / (P N).
            ranks = rankdata(self.p_mal[idx], axis=1)
            n_pos, n_neg = len(self.positives), len(self.negatives)
            scores["malignant_auc"] = (ranks[:, self.positives].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            if self.referred is not None:
                scores["sensitivity_at_threshold"] = self.referred[idx[:, self.positives]].mean(axis=1)
                scores["specificity_at_threshold"] = (~self.referred[idx[:, self.negatives]]).mean(axis=1)
        return scores


def _resampled(scorers: Sequence[_ResampleScorer], y_true: np.ndarray, n_boot: int, seed: int
               ) -> list[dict[str, np.ndarray]]:
    """Each scorer's scores on the same stratified resamples, concatenated over chunks."""
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in scorers]
    for idx in _bootstrap_chunks(y_true, n_boot, seed):
        for part, scorer in zip(parts, scorers):
            part.append(scorer(idx))
    return [{key: np.concatenate([chunk[key] for chunk in part]) for key in part[0]} for part in parts]


def _interval(values: np.ndarray, confidence: float) -> dict[str, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


def _check_bootstrap_inputs(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
                            confidence: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y), len(class_names)):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y)}, {len(class_names)})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}; expected a fraction in (0, 1), e.g. 0.95")
    if len(y) == 0:
        raise ValueError("a bootstrap interval needs at least one case")
    return y, probs


def bootstrap_intervals(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    operating_threshold: float | None = None,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, Any] | None:
    """Percentile bootstrap intervals of balanced accuracy, malignant AUC, per-class recall and, with a threshold,
    sensitivity and specificity at it: the one interval computation every report uses.

    Resampling is stratified by class (each class keeps its count), so a rare class is never absent from a
    resample; with a fixed `seed` the intervals repeat exactly. `n_boot=0` gives None (no intervals). A class with
    very few cases gets a narrow but meaningless recall interval: read it together with the class's support.
    """
    if n_boot == 0:
        return None
    y, probs = _check_bootstrap_inputs(y_true, probs, class_names, confidence)
    (scores,) = _resampled([_ResampleScorer(y, probs, class_names, malignant_classes, operating_threshold)], y,
                           n_boot, seed)
    out: dict[str, Any] = {"method": "percentile bootstrap, stratified by class", "confidence": confidence,
                           "n_boot": int(n_boot), "seed": int(seed)}
    for key in ("balanced_accuracy", "malignant_auc", "sensitivity_at_threshold", "specificity_at_threshold"):
        if key in scores:
            out[key] = _interval(scores[key], confidence)
    out["recall"] = {key.split("/", 1)[1]: _interval(values, confidence)
                     for key, values in scores.items() if key.startswith("recall/")}
    return out


def paired_bootstrap_delta(
    y_true: Sequence[int],
    probs_ref: np.ndarray,
    probs_new: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Change (new - reference) in balanced accuracy and malignant AUC with a paired bootstrap interval.

    Both models are scored on the same resampled cases (stratified by class, as in `bootstrap_intervals`), so the
    interval reflects the difference between them, not each model's own sampling noise. `probs_new` may also be
    (runs, cases, classes), e.g. one model trained with several seeds: the change is then the mean over runs of
    each run's change, on every resample.
    """
    y, probs_ref = _check_bootstrap_inputs(y_true, probs_ref, class_names, confidence)
    probs_new = np.asarray(probs_new, dtype=np.float64)
    runs_new = probs_new[None] if probs_new.ndim == 2 else probs_new
    if runs_new.ndim != 3 or runs_new.shape[1:] != probs_ref.shape:
        raise ValueError(f"probabilities of shapes {probs_ref.shape} and {probs_new.shape} do not both cover the "
                         f"{len(y)} cases")
    reference = _ResampleScorer(y, probs_ref, class_names, malignant_classes)
    if not reference.has_auc:
        raise ValueError(f"a paired comparison needs malignant ({list(malignant_classes)}) and benign cases; the "
                         f"{len(y)} cases lack one of them")
    scorers = [reference, *(_ResampleScorer(y, run, class_names, malignant_classes) for run in runs_new)]
    identity = np.arange(len(y))[None]
    points = [scorer(identity) for scorer in scorers]
    resampled = _resampled(scorers, y, n_boot, seed)
    out = {}
    for key in ("balanced_accuracy", "malignant_auc"):
        point = float(np.mean([p[key][0] for p in points[1:]]) - points[0][key][0])
        deltas = np.mean([r[key] for r in resampled[1:]], axis=0) - resampled[0][key]
        out[key] = {"delta": point, **_interval(deltas, confidence)}
    return out


def add_score_intervals(scores: Any, class_names: Sequence[str], malignant_classes: Sequence[str],
                        n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Any:
    """Attach `bootstrap_intervals` to a `CalibratedScores`' validation and test metrics (in place), so that the
    card (`scores.card_metrics()`) and the report carry them; returns `scores`."""
    threshold = scores.threshold["threshold"] if scores.threshold else None
    pairs = [(scores.val_metrics, scores.val_labels, scores.val_probs)]
    if scores.test_metrics is not None:
        pairs.append((scores.test_metrics, scores.test_labels, scores.test_probs))
    for metrics, labels, probs in pairs:
        intervals = bootstrap_intervals(labels, probs, class_names, malignant_classes, threshold, n_boot, seed)
        if intervals is not None:
            metrics["intervals"] = intervals
    return scores


# --------------------------------------------------------------------------------------------------------------------
# Bundles derived from other bundles, and images a bundle was trained on
