"""Datasets over bags (cached features or patches), their collate function, and bag-level logits over a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.bags import Bag
from pipelines.calibration import calibrated_probs
from pipelines.mil.features import patches_to_tensor

__all__ = [
    "FeatureBagDataset",
    "PatchBagDataset",
    "collate_bags",
    "dataset_bag_logits",
    "predict_dataset_bags",
]


class FeatureBagDataset(Dataset):
    """Bags of cached instance features: item = ((N, D) features, label index)."""

    def __init__(self, features: Sequence[torch.Tensor], labels: Sequence[int]) -> None:
        self.features = list(features)
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.labels[index]


class PatchBagDataset(Dataset):
    """Bags of patches for a trainable encoder: item = ((N, 3, s, s) patches, label index).

    For training, at most `max_instances` patches are drawn per bag and flipped/rotated by 90 degrees at random.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        labels: Sequence[int],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        max_instances: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.bags, self.labels = list(bags), [int(y) for y in labels]
        self.input_size, self.mean, self.std = input_size, list(mean), list(std)
        self.max_instances, self.augment = max_instances, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patches = self.bags[index].patches
        if self.max_instances is not None and len(patches) > self.max_instances:
            patches = patches[np.sort(self.rng.choice(len(patches), self.max_instances, replace=False))]
        if self.augment:
            patches = np.rot90(patches, k=int(self.rng.integers(4)), axes=(1, 2))
            if self.rng.random() < 0.5:
                patches = patches[:, :, ::-1]
        return patches_to_tensor(patches, self.input_size, self.mean, self.std), self.labels[index]


def collate_bags(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to the longest one: (x (B, N, ...), mask (B, N) True for real instances, labels (B,))."""
    n_max = max(x.shape[0] for x, _ in items)
    x = torch.zeros((len(items), n_max, *items[0][0].shape[1:]), dtype=items[0][0].dtype)
    mask = torch.zeros((len(items), n_max), dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return x, mask, torch.tensor([y for _, y in items], dtype=torch.long)


@torch.no_grad()
def dataset_bag_logits(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> np.ndarray:
    """(B, C) logits for every bag of a dataset."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_bags)
    logits = [model(x, mask).float() for x, mask, _ in loader]
    return torch.cat(logits).numpy() if logits else np.zeros((0, 0))


@torch.no_grad()
def predict_dataset_bags(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, calibration: dict[str, Any] | None = None
) -> np.ndarray:
    """(B, C) (calibrated) class probabilities for every bag of a dataset."""
    return calibrated_probs(dataset_bag_logits(model, dataset, batch_size), calibration)
