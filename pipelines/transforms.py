"""Deterministic preprocessing (shared by training, evaluation and serving) and random training augmentation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

# Shades-of-Gray exponent that works best on dermoscopy (Finlayson & Trezzi 2004; Barata et al. 2015 on ISIC).
SHADES_OF_GRAY_P = 6


def shades_of_gray(array: np.ndarray, p: float = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades-of-Gray colour constancy on an HxWx3 uint8 image: divide out the illuminant's per-channel Minkowski mean.

    The illuminant estimate is e_c = (mean(I_c ** p)) ** (1 / p) (Finlayson & Trezzi 2004, eq. 6); each channel is
    multiplied by mean(e) / e_c, so a grey-balanced image is returned unchanged and overall brightness is kept.
    """
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"colour constancy needs an H x W x 3 image, got shape {array.shape}")
    pixels = array.astype(np.float64)
    illuminant = np.power(np.mean(np.power(pixels, p), axis=(0, 1)), 1.0 / p)
    if np.any(illuminant <= 0):  # a channel that is black everywhere has no cast to remove
        return array
    gains = illuminant.mean() / illuminant
    return np.clip(np.rint(pixels * gains), 0, 255).astype(np.uint8)


def dihedral_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views (4 rotations by 90 degrees, each with and without a horizontal flip) of NCHW images."""
    views = []
    for flipped in (batch, torch.flip(batch, dims=(3,))):
        for k in range(4):
            views.append(torch.rot90(flipped, k, dims=(2, 3)))
    return views


TTA_CHOICES = (1, 8)
MAX_FORWARD_BATCH = 64


def card_tta(card: dict) -> int:
    """How many test-time-augmentation views a bundle was validated with (1 for bundles that do not say)."""
    return int((card.get("inference") or {}).get("tta", 1))


def check_tta(tta: int) -> int:
    if tta not in TTA_CHOICES:
        raise ValueError(f"test-time augmentation takes {' or '.join(map(str, TTA_CHOICES))} views, got {tta}")
    return tta


def view_logits(model: torch.nn.Module, batch: torch.Tensor, tta: int = 1) -> torch.Tensor:
    """(N, V, C) float32 logits of V = `tta` dihedral views of an NCHW batch (one forward over all views)."""
    check_tta(tta)
    if tta == 1:
        return model(batch).float()[:, None]
    layout = torch.channels_last if batch.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    views = [view.contiguous(memory_format=layout) for view in dihedral_views(batch)]
    if len(batch) * len(views) <= MAX_FORWARD_BATCH:  # one forward over all views (serving: batch 1 -> 8)
        logits = model(torch.cat(views)).float().reshape(len(views), len(batch), -1)
    else:  # large CPU batches run slower per image than several small ones
        logits = torch.stack([model(view).float() for view in views])
    return logits.transpose(0, 1)


class EvalTransform:
    """Resize the shorter side to `size`, centre-crop `size` x `size`, [colour constancy], normalise, CHW tensor.

    `color_constancy` is None or "shades_of_gray"; training, evaluation, prediction and the app build this class from
    the same settings (the bundle's card), so they all preprocess alike.
    """

    def __init__(self, size: int, mean: list[float], std: list[float], color_constancy: str | None = None) -> None:
        if color_constancy not in (None, "shades_of_gray"):
            raise ValueError(f"unknown colour constancy '{color_constancy}'; expected none or 'shades_of_gray'")
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.color_constancy = color_constancy

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """The geometric part alone (used to overlay explanations on what the model saw)."""
        width, height = image.size
        scale = self.size / min(width, height)
        new = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def correct_colour(self, array: np.ndarray) -> np.ndarray:
        """The colour step alone (identity when colour constancy is off)."""
        return shades_of_gray(array) if self.color_constancy == "shades_of_gray" else array

    def normalize(self, array: np.ndarray) -> torch.Tensor:
        """uint8 HWC array -> normalised float CHW tensor."""
        array = (array.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def crop_array(self, image: Image.Image) -> np.ndarray:
        """The uint8 HWC crop the model sees, before colour correction (what the image cache stores)."""
        return np.asarray(self.resize_crop(image.convert("RGB")))

    def from_crop(self, crop: np.ndarray) -> torch.Tensor:
        """Tensor from a cached `crop_array`: colour correction, then normalisation."""
        return self.normalize(self.correct_colour(crop))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.from_crop(self.crop_array(image))


def eval_transform(
    size: int, mean: list[float], std: list[float], color_constancy: str | None = None
) -> EvalTransform:
    """The deterministic transform; serving applies exactly this."""
    return EvalTransform(size, mean, std, color_constancy)


def card_transform(card: dict) -> EvalTransform:
    """The deterministic preprocessing a bundle's card prescribes (input size, normalisation, colour constancy);
    prediction, evaluation, the app and every stage that re-reads a bundle's images build it here."""
    norm = card["normalization"]
    constancy = (card.get("preprocessing") or {}).get("color_constancy")
    return eval_transform(int(card["input_size"]), norm["mean"], norm["std"], constancy)


class TrainTransform:
    """EvalTransform's crop and colour correction, then dermoscopy augmentation, then the same normalisation."""

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        scale: tuple[float, float] = (0.6, 1.0),
        color_constancy: str | None = None,
    ) -> None:
        import albumentations as A

        self.base = EvalTransform(size, mean, std, color_constancy)
        self.size = size
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

    def crop_array(self, image: Image.Image) -> np.ndarray:
        return self.base.crop_array(image)

    def from_crop(self, crop: np.ndarray) -> torch.Tensor:
        """Colour correction first (as at evaluation), then the random augmentation, then normalisation."""
        return self.base.normalize(self.augment(image=self.base.correct_colour(crop))["image"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.from_crop(self.crop_array(image))


def train_transform(
    size: int, mean: list[float], std: list[float], color_constancy: str | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """Random augmentation for training images."""
    return TrainTransform(size, mean, std, color_constancy=color_constancy)
