"""The project's trainer (Hugging Face Accelerate), its cost-sensitive losses and samplers, and image-classifier
training from a run config.

Modules: `losses` (class weighting, focal, logit-adjusted), `samplers` (class counts, balanced / sqrt samplers),
`schedule` (warm-up + cosine, time budget, EMA), `forward` (batch -> logits / loss, mixup, cutmix), `accelerator`,
`checkpoints`, `loop` (`fit` and its validation loop), `train` (`train_from_config`).
"""

from __future__ import annotations

from pipelines.training.accelerator import make_accelerator
from pipelines.training.checkpoints import BEST_FILE, BEST_RAW_FILE, EMA_FILE, LAST_RAW_FILE
from pipelines.training.forward import (
    Batch,
    ForwardFn,
    LossFn,
    channels_last_forward,
    default_forward,
    mixing_loss_forward,
)
from pipelines.training.loop import FitResult, fit, predict_loader
from pipelines.training.losses import FocalLoss, LogitAdjustedLoss, build_loss, class_weights
from pipelines.training.samplers import build_sampler, class_counts, sampling_weights
from pipelines.training.schedule import ema_update, epochs_within_budget, warmup_cosine
from pipelines.training.train import fit_training_ood, train_from_config

__all__ = [
    "BEST_FILE",
    "BEST_RAW_FILE",
    "EMA_FILE",
    "LAST_RAW_FILE",
    "Batch",
    "FitResult",
    "FocalLoss",
    "ForwardFn",
    "LogitAdjustedLoss",
    "LossFn",
    "build_loss",
    "build_sampler",
    "channels_last_forward",
    "class_counts",
    "class_weights",
    "default_forward",
    "ema_update",
    "epochs_within_budget",
    "fit",
    "fit_training_ood",
    "make_accelerator",
    "mixing_loss_forward",
    "predict_loader",
    "sampling_weights",
    "train_from_config",
    "warmup_cosine",
]
