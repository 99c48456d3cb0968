"""Batch prediction from a model bundle: the one code path used by `lesionlab predict`, evaluation and the app."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from models.bundle import Bundle, load_bundle
from pipelines.images import IMAGE_SUFFIXES, ImageError, ImageLimits, load_image
from pipelines.transforms import eval_transform

log = logging.getLogger(__name__)


class Predictor:
    """Wraps a loaded bundle: preprocessing exactly as in evaluation, softmax probabilities, P(malignant)."""

    def __init__(self, bundle: Bundle, limits: ImageLimits | None = None, batch_size: int = 32) -> None:
        self.bundle = bundle
        self.class_names = bundle.class_names
        norm = bundle.card["normalization"]
        self.transform = eval_transform(bundle.input_size, norm["mean"], norm["std"])
        self.limits = limits or ImageLimits(min_side=int(bundle.card.get("min_input_side", 32)))
        self.batch_size = batch_size
        self.device = next(bundle.model.parameters()).device
        self._lock = threading.Lock()  # one forward at a time per model: safe under Gradio's thread pool
        present = [c for c in bundle.malignant_classes if c in self.class_names]
        self.malignant_index = [self.class_names.index(c) for c in present]

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu") -> "Predictor":
        """Load the bundle at `path` and wrap it."""
        return cls(load_bundle(path, device=device))

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, C) class probabilities for RGB images."""
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(im) for im in images[start : start + self.batch_size]])
            with self._lock:
                logits = self.bundle.model(batch.to(self.device))
            outputs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(outputs)

    def malignant_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(malignant) per row (sum over the bundle's malignant classes); NaN when it names none."""
        if not self.malignant_index:
            return np.full(len(probs), np.nan)
        return probs[:, self.malignant_index].sum(axis=1)

    def table(self, image_ids: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
        """The prediction table: image_id, pred_label, prob_<class>..., prob_malignant."""
        table = pd.DataFrame({"image_id": list(image_ids)})
        table["pred_label"] = [self.class_names[i] for i in probs.argmax(axis=1)] if len(probs) else []
        for c, name in enumerate(self.class_names):
            table[f"prob_{name}"] = probs[:, c] if len(probs) else []
        table["prob_malignant"] = self.malignant_probability(probs) if len(probs) else []
        return table

    def predict_files(self, paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[ImageError]]:
        """Predict every readable file; unreadable ones are logged by name, skipped and returned as errors."""
        images, ids, errors = [], [], []
        for path in paths:
            try:
                images.append(load_image(path, self.limits))
                ids.append(Path(path).stem)
            except ImageError as err:
                log.warning("skipped: %s", err)
                errors.append(err)
        return self.table(ids, self.predict(images)), errors


def write_predictions(table: pd.DataFrame, errors: Sequence[object], out: str | Path, what: str = "images") -> Path:
    """Write a prediction CSV, report each skipped item on stderr, and print a one-line summary."""
    import sys

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6f")
    for err in errors:
        print(f"skipped: {err}", file=sys.stderr)
    print(f"{len(table)} predictions written to {out}; {len(errors)} {what} skipped")
    return out


def list_images(source: str | Path) -> list[Path]:
    """Image files from a folder (recursively) or from a CSV with a `path` (or `image`) column."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"folder '{source}' holds no files")
        # Every file is tried, so that a corrupt or mislabelled file is reported rather than silently ignored.
        return [
            p
            for p in files
            if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() not in {".csv", ".json", ".md", ".txt"}
        ]
    if source.is_file() and source.suffix.lower() == ".csv":
        return paths_from_csv(source, "image files")
    raise FileNotFoundError(f"'{source}' is neither a folder of images nor a CSV listing them")


def paths_from_csv(source: Path, what: str) -> list[Path]:
    """The files a CSV lists in its `path` (or `image`) column; relative paths are relative to the CSV."""
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    column = "path" if "path" in table.columns else "image" if "image" in table.columns else None
    if column is None:
        raise ValueError(f"CSV '{source}' needs a 'path' (or 'image') column listing {what}")
    return [Path(p) if Path(p).is_absolute() else source.parent / p for p in table[column]]
