"""How a batch becomes logits and a loss: the plain forward, channels-last layout, mixup / cutmix.

References:
    Zhang, Cisse, Dauphin, Lopez-Paz. mixup: Beyond Empirical Risk Minimization. ICLR 2018.
    Yun, Han, Oh, Chun, Choe, Yoo. CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
    Features. ICCV 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Batch", "ForwardFn", "LossFn", "channels_last_forward", "default_forward", "mixing_loss_forward"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) batch -> (logits, labels)."""
    images, labels = batch
    return model(images), labels


def channels_last_forward(forward: ForwardFn) -> ForwardFn:
    """`forward` with the images of each batch in channels-last layout."""

    def wrapped(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return forward(model, (images.contiguous(memory_format=torch.channels_last), labels))

    return wrapped


def mixing_loss_forward(
    loss_fn: LossFn, mixup_alpha: float, cutmix_alpha: float, prob: float, seed: int = 0, channels_last: bool = False
) -> Callable[[nn.Module, Batch, int], torch.Tensor]:
    """A `loss_forward` that mixes a share `prob` of the batches by mixup (Zhang et al. 2018) or cutmix (Yun et al.
    2019), with λ ~ Beta(α, α), and mixes the loss of the two label sets by the same λ."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixing needs mixup_alpha or cutmix_alpha above 0")
    rng = np.random.default_rng(seed)

    def loss_forward(model: nn.Module, batch: Batch, epoch: int) -> torch.Tensor:
        images, labels = batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if rng.random() >= prob:
            return loss_fn(model(images).float(), labels)
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
        perm = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
        if use_cutmix:
            height, width = images.shape[-2:]
            cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            images = images.clone()
            images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        else:
            images = lam * images + (1 - lam) * images[perm]
        logits = model(images).float()
        return lam * loss_fn(logits, labels) + (1 - lam) * loss_fn(logits, labels[perm])

    return loss_forward
