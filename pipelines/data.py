"""Torch datasets over manifest rows, and the memory-mapped cache of decoded, resized images they can read from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pipelines.images import ImageLimits, load_image

log = logging.getLogger(__name__)


def _rows_key(paths: Sequence[str], size: int) -> str:
    """Hash of the rows' paths, each file's size and modification time, and the crop size."""
    digest = hashlib.sha256(f"size={size}\n".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class ImageCache:
    """Decoded, resized and centre-cropped uint8 images of a list of files, in one memory-mapped array.

    The array (`<key>.u8`, N x size x size x 3) is keyed by a hash of the files (path, byte size, modification time)
    and the crop size, so a changed manifest or size builds a new cache instead of reading a stale one; it is written
    to a temporary file and renamed, so a killed build leaves nothing half-written. Worker processes share the pages.
    """

    def __init__(self, folder: str | Path, paths: Sequence[str], crop: Callable[[Image.Image], np.ndarray],
                 size: int) -> None:
        self.folder = Path(folder)
        self.paths = [str(p) for p in paths]
        self.size = size
        self.key = _rows_key(self.paths, size)
        self.file = self.folder / f"{self.key}.u8"
        if not self.file.is_file():
            self._build(crop)
        self.array = np.memmap(self.file, dtype=np.uint8, mode="r", shape=(len(self.paths), size, size, 3))

    def _build(self, crop: Callable[[Image.Image], np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        shape = (len(self.paths), self.size, self.size, 3)
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        limits = ImageLimits(min_side=8)
        for i, path in enumerate(tqdm(self.paths, desc=f"caching images at {self.size} px", leave=False,
                                      disable=len(self.paths) < 256)):
            array = crop(load_image(path, limits))
            if array.shape != (self.size, self.size, 3):
                raise ValueError(f"image cache: '{path}' cropped to {array.shape}; expected ({self.size}, "
                                 f"{self.size}, 3)")
            out[i] = array
        out.flush()
        del out
        os.replace(tmp, self.file)
        (self.folder / f"{self.key}.json").write_text(json.dumps({"size": self.size, "n": len(self.paths)}))
        log.info("image cache of %d images at %d px written to %s", len(self.paths), self.size, self.file)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self.array[index])


class ImageDataset(Dataset):
    """(image tensor, class index) pairs for the rows of a manifest.

    With `cache_dir`, the transform's deterministic crop (`transform.crop_array`) of every row is decoded once into an
    ImageCache there and each item is built from it (`transform.from_crop`); the tensors are identical to decoding.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        class_names: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        cache_images: bool = False,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        unknown = sorted(set(manifest.label) - set(class_names))
        if unknown:
            raise ValueError(f"manifest has labels {unknown} that are not among the classes {class_names}")
        self.paths = manifest.path.tolist()
        self.labels = [class_names.index(label) for label in manifest.label]
        self.transform = transform
        self.limits = ImageLimits(min_side=8)
        self._cache: dict[int, Image.Image] | None = {} if cache_images and cache_dir is None else None
        self.crops: ImageCache | None = None
        if cache_dir is not None:
            if not (hasattr(transform, "crop_array") and hasattr(transform, "from_crop")):
                raise ValueError("an image cache needs a transform with crop_array and from_crop (EvalTransform, "
                                 "TrainTransform)")
            self.crops = ImageCache(cache_dir, self.paths, transform.crop_array, transform.size)
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
        if self.crops is not None:
            return self.transform.from_crop(self.crops[index]), self.labels[index]
        return self.transform(self.image(index)), self.labels[index]
