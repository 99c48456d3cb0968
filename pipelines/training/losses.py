"""Cost-sensitive training losses: class weighting (inverse frequency, effective number), focal, logit-adjusted.

References:
    Cui, Jia, Lin, Song, Belongie. Class-Balanced Loss Based on Effective Number of Samples. CVPR 2019 (eq. 4).
    Lin, Goyal, Girshick, He, Dollár. Focal Loss for Dense Object Detection. ICCV 2017 (eq. 5).
    Menon, Jayasumana, Rawat, Jain, Veit, Kumar. Long-Tail Learning via Logit Adjustment. ICLR 2021 (eq. 10).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocalLoss", "LogitAdjustedLoss", "build_loss", "class_weights"]

def class_weights(counts: Sequence[int], scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights, normalised to mean 1.

    inverse:   w_c ∝ 1 / n_c
    effective: w_c ∝ (1 - β) / (1 - β^n_c)   (Cui et al. 2019, "effective number of samples", eq. 4)
    """
    counts_arr = np.asarray(counts, dtype=np.float64)
    if (counts_arr <= 0).any():
        raise ValueError(f"every class needs at least one training sample, got {counts_arr.astype(int).tolist()}")
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
    """Focal loss (Lin et al. 2017, eq. 5): -α_y (1 - p_t)^γ log p_t, averaged over the batch (not over Σ α)."""

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
    """The training loss by name (ce, focal, logit-adjusted), optionally class-weighted.

    Args:
        name: ce, focal or logit-adjusted.
        counts: training samples per class, in class order.
        weighting: none, inverse or effective (see `class_weights`).
        beta: effective-number β.
        gamma: focal γ.
        tau: logit-adjustment τ.
        label_smoothing: for ce only.
    """
    weight = None if weighting == "none" else class_weights(counts, weighting, beta)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma, weight)
    if name == "logit-adjusted":
        priors = torch.tensor(counts, dtype=torch.float64)
        if (priors <= 0).any():
            raise ValueError(f"logit adjustment needs every class in the training data, got counts {list(counts)}")
        return LogitAdjustedLoss(priors / priors.sum(), tau, weight)
    raise ValueError(f"unknown loss '{name}'; expected ce, focal or logit-adjusted")
