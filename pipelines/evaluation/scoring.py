"""The one post-training recipe of every stage that writes an image bundle: calibrate on validation (with the
shipped test-time augmentation), choose the referral threshold there, score the test split the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipelines.calibration import calibrated_probs, fit_calibration
from pipelines.evaluation.metrics import card_metrics, compute_metrics, expected_calibration_error, referral_threshold
from pipelines.prediction import dataset_logits

__all__ = ["CalibratedScores", "calibrate_and_score"]


@dataclass
class CalibratedScores:
    """A model's validation (and test) scores after calibration and test-time augmentation, as a bundle ships it."""

    calibration: dict[str, Any]
    tta: int
    threshold: dict[str, float] | None
    val_labels: np.ndarray
    val_probs: np.ndarray
    val_probs_uncalibrated: np.ndarray
    val_metrics: dict[str, Any]
    test_labels: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    test_probs_uncalibrated: np.ndarray | None = None
    test_metrics: dict[str, Any] | None = None
    inference_images_per_s: float = float("nan")

    def card_metrics(self) -> dict[str, Any]:
        """The card's `metrics` block: validation, and test when there was a test split."""
        block = {"validation": card_metrics(self.val_metrics)}
        if self.test_metrics is not None:
            block["test"] = card_metrics(self.test_metrics)
        return block


def calibrate_and_score(
    model: nn.Module,
    val_ds,
    test_ds,
    class_names: list[str],
    malignant: list[str],
    tta: int = 8,
    method: str = "temperature",
    target_sensitivity: float = 0.9,
    logits_out: Path | None = None,
) -> CalibratedScores:
    """Fit the calibration on validation with the shipped test-time augmentation, choose the referral threshold on
    the calibrated validation probabilities, and score the test split the same way (the one post-training recipe of
    every stage that writes an image bundle)."""
    val_logits, val_labels = dataset_logits(model, val_ds, tta)
    calibration = fit_calibration(val_logits, val_labels, method, fitted_on=f"validation split ({len(val_labels)} "
                                  f"images, tta {tta})")
    val_probs = calibrated_probs(val_logits, calibration)
    threshold = referral_threshold(val_labels, val_probs, class_names, malignant, target_sensitivity)
    scores = CalibratedScores(
        calibration=calibration,
        tta=tta,
        threshold=threshold,
        val_labels=val_labels,
        val_probs=val_probs,
        val_probs_uncalibrated=calibrated_probs(val_logits, None),
        val_metrics=compute_metrics(val_labels, val_probs, class_names, malignant,
                                    threshold["threshold"] if threshold else None),
    )
    arrays = {"val_logits": val_logits, "val_labels": val_labels}
    if test_ds is not None and len(test_ds):
        started = time.perf_counter()
        test_logits, test_labels = dataset_logits(model, test_ds, tta)
        scores.inference_images_per_s = len(test_labels) / (time.perf_counter() - started)
        scores.test_labels = test_labels
        scores.test_probs = calibrated_probs(test_logits, calibration)
        scores.test_probs_uncalibrated = calibrated_probs(test_logits, None)
        scores.test_metrics = compute_metrics(test_labels, scores.test_probs, class_names, malignant,
                                              threshold["threshold"] if threshold else None)
        scores.test_metrics["ece_uncalibrated"] = expected_calibration_error(test_labels,
                                                                             scores.test_probs_uncalibrated)
        arrays.update(test_logits=test_logits, test_labels=test_labels)
    if logits_out is not None:
        logits_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(logits_out, **arrays)
    return scores
