"""Class-imbalance stage: feature-space SMOTE family with decoupled head re-training, threshold moving, pixel-space
SMOTE for small images, and the `lesionlab run` stage.

Modules: `resampling` (imbalanced-learn SMOTE family, training-split guard), `head` (embeddings, cRT head
re-training, prior correction), `bundle` (`balance_bundle`), `pixel` (`pixel_smote`, contact sheet), `report`,
`settings`, `stage` (`run_balancing_stage`). The cost-sensitive losses and samplers live in `pipelines.training`;
they are re-exported here for callers that balance through them.
"""

from __future__ import annotations

from pipelines.balancing.bundle import balance_bundle
from pipelines.balancing.head import (
    apply_prior_correction,
    embed_dataset,
    head_probs,
    prior_corrected_probs,
    train_head,
)
from pipelines.balancing.pixel import contact_sheet, pixel_smote
from pipelines.balancing.report import compare_heads, write_balancing_report
from pipelines.balancing.resampling import FEATURE_METHODS, FeatureResampler, oversample_split, target_counts
from pipelines.balancing.settings import load_balancing_config
from pipelines.balancing.stage import run_balancing_stage
from pipelines.config import MAX_PIXEL_SMOTE_SIZE, BalancingConfig
from pipelines.training.losses import FocalLoss, LogitAdjustedLoss, build_loss, class_weights
from pipelines.training.samplers import build_sampler, sampling_weights

__all__ = [
    "FEATURE_METHODS",
    "MAX_PIXEL_SMOTE_SIZE",
    "BalancingConfig",
    "FeatureResampler",
    "FocalLoss",
    "LogitAdjustedLoss",
    "apply_prior_correction",
    "balance_bundle",
    "build_loss",
    "build_sampler",
    "class_weights",
    "compare_heads",
    "contact_sheet",
    "embed_dataset",
    "head_probs",
    "load_balancing_config",
    "oversample_split",
    "pixel_smote",
    "prior_corrected_probs",
    "run_balancing_stage",
    "sampling_weights",
    "target_counts",
    "train_head",
    "write_balancing_report",
]
