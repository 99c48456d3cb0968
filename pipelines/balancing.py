"""Class-imbalance toolkit: cost-sensitive losses, class-balanced samplers, feature-space SMOTE, threshold moving."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler

log = logging.getLogger(__name__)


def class_weights(counts: Sequence[int], scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights, normalised to mean 1.

    inverse:   w_c ∝ 1 / n_c
    effective: w_c ∝ (1 - β) / (1 - β^n_c)   (Cui et al. 2019, "effective number of samples", eq. 4)
    """
    counts_arr = np.asarray(counts, dtype=np.float64)
    if (counts_arr <= 0).any():
        raise ValueError(f"every class needs at least one training sample, got counts {counts_arr.astype(int).tolist()}")
    if scheme == "none":
        weights = np.ones_like(counts_arr)
    elif scheme == "inverse":
        weights = 1.0 / counts_arr
    elif scheme == "effective":
        if not 0 <= beta < 1:
            raise ValueError(f"effective-number beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - np.power(beta, counts_arr))
    else:
        raise ValueError(f"unknown class weighting '{scheme}'; expected none, inverse or effective")
    weights = weights / weights.mean()
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -α_c (1 - p_t)^γ log p_t, averaged over the batch."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021, eq. 10): CE(logits + τ log π, y) during training only."""

    def __init__(self, priors: torch.Tensor, tau: float = 1.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("adjustment", tau * torch.log(priors.float()))
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, target, weight=self.weight)


def build_loss(
    name: str,
    counts: Sequence[int],
    weighting: str = "none",
    beta: float = 0.999,
    gamma: float = 2.0,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The training loss by name (ce, focal, logit-adjusted), optionally class-weighted."""
    weight = None if weighting == "none" else class_weights(counts, weighting, beta)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma, weight)
    if name == "logit-adjusted":
        priors = torch.tensor(counts, dtype=torch.float64)
        return LogitAdjustedLoss(priors / priors.sum(), tau, weight)
    raise ValueError(f"unknown loss '{name}'; expected ce, focal or logit-adjusted")


def sampling_weights(labels: Sequence[int], num_classes: int, mode: str) -> np.ndarray:
    """Per-sample weights: 'balanced' draws every class equally, 'sqrt' in proportion to sqrt(n_c)."""
    labels_arr = np.asarray(labels)
    counts = np.bincount(labels_arr, minlength=num_classes).astype(np.float64)
    if mode == "balanced":
        class_mass = np.ones(num_classes)
    elif mode == "sqrt":
        class_mass = np.sqrt(counts)
    else:
        raise ValueError(f"unknown sampler '{mode}'; expected none, balanced or sqrt")
    class_mass = np.where(counts > 0, class_mass, 0.0)
    per_sample = class_mass[labels_arr] / counts[labels_arr]
    return per_sample / per_sample.sum()


def build_sampler(labels: Sequence[int], num_classes: int, mode: str, seed: int = 0) -> WeightedRandomSampler | None:
    """A with-replacement sampler that re-weights classes for one epoch of len(labels) draws, or None."""
    if mode == "none":
        return None
    weights = sampling_weights(labels, num_classes, mode)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), True, generator)
