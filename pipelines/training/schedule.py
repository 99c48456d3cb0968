"""Learning-rate schedule, time-budget planning and the weight EMA's update rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ema_update", "epochs_within_budget", "warmup_cosine"]


def warmup_cosine(total_steps: int | Callable[[], int], warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total_steps` (a number, or a callable read at
    every step, so a schedule can be re-planned to fit a time budget)."""
    total = total_steps if callable(total_steps) else (lambda: total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total() - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epochs_within_budget(budget_minutes: float, first_epoch_minutes: float, epochs: int) -> int:
    """How many epochs of the measured length fit the budget (at least 1, at most `epochs`)."""
    if first_epoch_minutes <= 0:
        return epochs
    return max(1, min(epochs, int(budget_minutes // first_epoch_minutes)))


def ema_update(decay: float) -> Callable[[list, list, Any], None]:
    """AveragedModel's update for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)) after n updates
    (as TensorFlow's ExponentialMovingAverage with num_updates), so short runs are not dominated by the start."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: Any) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        for ema_param, param in floats:
            ema_param.lerp_(param, weight)
        for ema_param, param in zip(ema_params, params):
            if not ema_param.is_floating_point():  # BatchNorm's num_batches_tracked
                ema_param.copy_(param)

    return update
