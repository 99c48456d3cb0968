"""Metrics that matter under imbalance, the headline list a card keeps, and the one referral-threshold rule."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "HEADLINE_METRICS",
    "card_metrics",
    "choose_operating_threshold",
    "compute_metrics",
    "expected_calibration_error",
    "macro_ovr_auc",
    "malignant_probability",
    "referral_threshold",
    "reliability_bins",
    "sensitivity_at_specificity",
]

log = logging.getLogger(__name__)

HEADLINE_METRICS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_auc",
    "malignant_auc",
    "sensitivity_at_80_specificity",
    "sensitivity_at_90_specificity",
    "ece",
)

# Every report's 95 % intervals come from a stratified bootstrap with BOOTSTRAP_RESAMPLES resamples and
# BOOTSTRAP_SEED (pipelines.config; see `bootstrap_intervals`); a report's caller may pass another number, 0 for none.


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a model card shows (no confusion matrix)."""
    keep = (*HEADLINE_METRICS, "at_operating_threshold", "ece_uncalibrated", "intervals")
    headline = {k: metrics[k] for k in keep if k in metrics}
    headline["recall"] = {name: row["recall"] for name, row in metrics.get("per_class", {}).items()}
    return headline


def malignant_probability(
    probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str]
) -> np.ndarray:
    """P(malignant) = sum of the malignant classes' probabilities."""
    unknown = sorted(set(malignant_classes) - set(class_names))
    if unknown:
        raise ValueError(f"malignant classes {unknown} are not among the model's classes {list(class_names)}")
    columns = [list(class_names).index(c) for c in malignant_classes]
    return probs[:, columns].sum(axis=1)


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among ROC points whose specificity is at least `specificity`."""
    fpr, tpr, _ = roc_curve(y_true, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            bins.append(
                {
                    "low": low,
                    "high": high,
                    "count": int(in_bin.sum()),
                    "accuracy": float(correct[in_bin].mean()),
                    "confidence": float(confidence[in_bin].mean()),
                }
            )
    return bins


def macro_ovr_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have both positives and negatives."""
    aucs = [
        roc_auc_score(y_true == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y_true == c).sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def choose_operating_threshold(
    y_malignant: np.ndarray, p_malignant: np.ndarray, target_sensitivity: float = 0.9
) -> dict[str, float]:
    """The highest threshold on P(malignant) whose sensitivity reaches the target (referral rule: p >= t)."""
    y = np.asarray(y_malignant).astype(bool)
    p = np.asarray(p_malignant, dtype=np.float64)
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("choosing an operating threshold needs both malignant and benign validation images")
    best = None
    for t in np.unique(p)[::-1]:
        sensitivity = float((p[y] >= t).mean())
        if sensitivity >= target_sensitivity:
            best = float(t)
            break
    if best is None:
        best = float(p.min())
    predicted = p >= best
    return {
        "threshold": best,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(predicted[y].mean()),
        "specificity": float((~predicted[~y]).mean()),
    }


def referral_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant: Sequence[str],
    target_sensitivity: float,
) -> dict[str, float] | None:
    """The referral threshold on P(malignant) chosen on (calibrated) validation probabilities for the target
    sensitivity; None when no malignant class is known or the split lacks malignant or benign images."""
    present = [c for c in malignant if c in class_names]
    if not present:
        return None
    y_mal = np.isin(np.asarray(class_names)[np.asarray(labels)], present)
    if y_mal.all() or not y_mal.any():
        log.warning("validation split lacks malignant or benign images; no operating threshold chosen")
        return None
    return choose_operating_threshold(y_mal, malignant_probability(probs, class_names, present), target_sensitivity)


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    operating_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number the report shows, from labels and predicted class probabilities."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true) or probs.shape[1] != len(class_names):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y_true)}, {len(class_names)})")
    pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_auc": macro_ovr_auc(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
    present = [c for c in malignant_classes if c in class_names]
    if present:
        y_mal = np.isin(np.asarray(class_names)[y_true], present)
        p_mal = malignant_probability(probs, class_names, present)
        if 0 < y_mal.sum() < len(y_mal):
            metrics["malignant_auc"] = float(roc_auc_score(y_mal, p_mal))
            metrics["sensitivity_at_80_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.80)
            metrics["sensitivity_at_90_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.90)
            if operating_threshold is not None:
                referred = p_mal >= operating_threshold
                metrics["at_operating_threshold"] = {
                    "threshold": float(operating_threshold),
                    "sensitivity": float(referred[y_mal].mean()),
                    "specificity": float((~referred[~y_mal]).mean()),
                }
    return metrics
