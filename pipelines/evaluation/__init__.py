"""Evaluation: metrics that matter under imbalance, the one referral-threshold rule, bootstrap intervals, the
leakage check, the report, and the post-training calibrate-and-score recipe.

Submodules: `metrics` (pure functions of labels and probabilities), `bootstrap`, `leakage`, `report`, `scoring`
(calibrate on validation, threshold, score test) and `bundle` (`evaluate_bundle`, behind `lesionlab evaluate`).
"""

from pipelines.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from pipelines.evaluation.bootstrap import (
    add_score_intervals,
    bootstrap_intervals,
    paired_bootstrap_delta,
    stratified_bootstrap_indices,
)
from pipelines.evaluation.bundle import (
    evaluate_bundle,
)
from pipelines.evaluation.leakage import (
    MAX_MANIFEST_BYTES,
    TRAINING_IMAGES_FILE,
    bundle_sha256,
    check_training_overlap,
    count_training_images,
    source_metrics,
    training_rows_of,
    write_training_images,
)
from pipelines.evaluation.metrics import (
    HEADLINE_METRICS,
    card_metrics,
    choose_operating_threshold,
    compute_metrics,
    expected_calibration_error,
    macro_ovr_auc,
    malignant_probability,
    referral_threshold,
    reliability_bins,
    sensitivity_at_specificity,
)
from pipelines.evaluation.report import (
    interval_text,
    save_plots,
    save_reliability_comparison,
    training_overlap_lines,
    write_report,
)
from pipelines.evaluation.scoring import (
    CalibratedScores,
    calibrate_and_score,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CalibratedScores",
    "HEADLINE_METRICS",
    "MAX_MANIFEST_BYTES",
    "TRAINING_IMAGES_FILE",
    "add_score_intervals",
    "bootstrap_intervals",
    "bundle_sha256",
    "calibrate_and_score",
    "card_metrics",
    "check_training_overlap",
    "choose_operating_threshold",
    "compute_metrics",
    "count_training_images",
    "evaluate_bundle",
    "expected_calibration_error",
    "interval_text",
    "macro_ovr_auc",
    "malignant_probability",
    "paired_bootstrap_delta",
    "referral_threshold",
    "reliability_bins",
    "save_plots",
    "save_reliability_comparison",
    "sensitivity_at_specificity",
    "source_metrics",
    "stratified_bootstrap_indices",
    "training_overlap_lines",
    "training_rows_of",
    "write_report",
    "write_training_images",
]
