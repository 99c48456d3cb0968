"""Class frequencies and class-re-weighting samplers (balanced: every class equally; sqrt: ∝ sqrt(n_c))."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import WeightedRandomSampler

__all__ = ["build_sampler", "class_counts", "sampling_weights"]


def class_counts(labels: Sequence[str] | pd.Series, class_names: Sequence[str]) -> list[int]:
    """Number of samples of each class, in `class_names` order (0 for a class without samples)."""
    series = pd.Series(list(labels), dtype=object)
    return [int((series == name).sum()) for name in class_names]


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
