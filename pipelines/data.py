"""Torch datasets over manifest rows."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipelines.images import ImageLimits, load_image


class ImageDataset(Dataset):
    """(image tensor, class index) pairs for the rows of a manifest."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        class_names: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        cache_images: bool = False,
        seed: int = 0,
    ) -> None:
        unknown = sorted(set(manifest.label) - set(class_names))
        if unknown:
            raise ValueError(f"manifest has labels {unknown} that are not among the classes {class_names}")
        self.paths = manifest.path.tolist()
        self.labels = [class_names.index(label) for label in manifest.label]
        self.transform = transform
        self.limits = ImageLimits(min_side=8)
        self._cache: dict[int, Image.Image] | None = {} if cache_images else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Random augmentation is a function of (seed, epoch, index), so runs repeat and resume exactly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        """The decoded RGB image of row `index`."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = load_image(self.paths[index], self.limits)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if hasattr(self.transform, "reseed"):
            self.transform.reseed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        return self.transform(self.image(index)), self.labels[index]
