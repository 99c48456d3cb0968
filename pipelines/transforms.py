"""Deterministic preprocessing (shared by training, evaluation and serving) and random training augmentation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


class EvalTransform:
    """Resize the shorter side to `size`, centre-crop `size` x `size`, scale to [0, 1], normalise, CHW tensor."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """The geometric part alone (used to overlay explanations on what the model saw)."""
        width, height = image.size
        scale = self.size / min(width, height)
        new = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def normalize(self, array: np.ndarray) -> torch.Tensor:
        """uint8 HWC array -> normalised float CHW tensor."""
        array = (array.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(np.asarray(self.resize_crop(image.convert("RGB"))))


def eval_transform(size: int, mean: list[float], std: list[float]) -> EvalTransform:
    """The deterministic transform; serving applies exactly this."""
    return EvalTransform(size, mean, std)


class TrainTransform:
    """Dermoscopy augmentation (albumentations), then the same normalisation as EvalTransform."""

    def __init__(self, size: int, mean: list[float], std: list[float], scale: tuple[float, float] = (0.6, 1.0)) -> None:
        import albumentations as A

        self.base = EvalTransform(size, mean, std)
        # Lesions have no canonical orientation: flips and 90-degree turns are label-preserving. Colour jitter is kept
        # small because colour is diagnostic (blue-grey, red, black structures).
        self.augment = A.Compose(
            [
                A.RandomResizedCrop(size=(size, size), scale=scale, ratio=(0.8, 1.25)),
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.RandomRotate90(p=0.5),
                A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.8),
            ]
        )

    def reseed(self, seed: int) -> None:
        """Make the next draw a function of `seed` (the dataset passes seed, epoch and index: repeatable runs)."""
        self.augment.set_random_seed(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"))
        return self.base.normalize(self.augment(image=array)["image"])


def train_transform(size: int, mean: list[float], std: list[float]) -> Callable[[Image.Image], torch.Tensor]:
    """Random augmentation for training images."""
    return TrainTransform(size, mean, std)
