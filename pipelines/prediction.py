"""Batch prediction from a model bundle: the one code path used by `lesionlab predict`, evaluation and the app."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from models.bundle import Bundle, load_bundle
from pipelines.calibration import calibrated_probs
from pipelines.export import onnx_net_of
from pipelines.images import IMAGE_SUFFIXES, ImageError, ImageLimits, load_image
from pipelines.ood import detector_of, first_view_features, head_inputs
from pipelines.transforms import (
    MAX_FORWARD_BATCH,
    card_transform,
    card_tta,
    check_tta,
    dihedral_views,
    view_logits,
)

log = logging.getLogger(__name__)


def dataset_logits(
    model: torch.nn.Module, dataset, tta: int = 1, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """((N, V, C) logits, (N,) labels) over a dataset of (image tensor, label) on the model's device.

    The layout change runs outside inference mode, so the model's parameters stay trainable afterwards."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    # Channels-last convolutions are faster on CPU (benchmarks/train_throughput.py); the layout is restored after.
    model.to(memory_format=torch.channels_last)
    logits, labels = [], []
    try:
        for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), desc=f"predicting (tta {tta})",
                                    leave=False, disable=len(dataset) < 256):
            batch = images.to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                logits.append(view_logits(model, batch, tta).cpu().numpy())
            labels.append(np.asarray(targets))
    finally:
        model.to(memory_format=torch.contiguous_format)
    return np.concatenate(logits), np.concatenate(labels)


def combine_members(member_probs: Sequence[np.ndarray], calibration: dict | None = None) -> np.ndarray:
    """An ensemble's probabilities: the mean of its members' calibrated probabilities, then, when the ensemble has a
    calibration of its own, that map applied to the log of the mean."""
    mean = np.mean(member_probs, axis=0)
    if not calibration:
        return mean
    return calibrated_probs(np.log(np.clip(mean, 1e-12, None)), calibration)


class _Member:
    """One network of a bundle with its own preprocessing, calibration and test-time augmentation."""

    def __init__(self, bundle: Bundle, tta: int | None, engine: str = "auto") -> None:
        self.model = bundle.model
        self.transform = card_transform(bundle.card)
        self.calibration = bundle.card.get("calibration")
        self.tta = check_tta(int(tta)) if tta is not None else card_tta(bundle.card)
        self.device = next(bundle.model.parameters()).device
        # The exported network under ONNX Runtime when the bundle carries one (CPU only); the eager one otherwise.
        self.onnx = onnx_net_of(bundle.path, bundle.card, engine) if self.device.type == "cpu" else None
        # Channels-last convolutions run about twice as fast on CPU (benchmarks/train_throughput.py records it).
        cpu_eager = self.device.type == "cpu" and self.onnx is None
        self.layout = torch.channels_last if cpu_eager else torch.contiguous_format
        self.model.to(memory_format=self.layout)

    @property
    def engine(self) -> str:
        return "eager" if self.onnx is None else f"onnx ({self.onnx.path.name})"

    def forward(self, batch: torch.Tensor, with_features: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        """((N, V, C) logits of the test-time views, (N, D) head-input features of the first view or None)."""
        if self.onnx is None:
            capture = head_inputs(self.model) if with_features else None
            with capture or nullcontext() as captured:
                logits = view_logits(self.model, batch, self.tta)
            return logits, first_view_features(captured, len(batch)) if captured is not None else None
        views = dihedral_views(batch) if check_tta(self.tta) == 8 else [batch]
        stacked = torch.cat(views)
        outputs = [self.onnx(stacked[i : i + MAX_FORWARD_BATCH]) for i in range(0, len(stacked), MAX_FORWARD_BATCH)]
        logits = torch.cat([out[0] for out in outputs]).float().reshape(len(views), len(batch), -1).transpose(0, 1)
        if not with_features:
            return logits, None
        if outputs[0][1] is None:
            raise TypeError(f"{self.onnx.path} has no features output; the out-of-distribution score needs it")
        return logits, torch.cat([out[1] for out in outputs])[: len(batch)].float().numpy()


class Predictor:
    """Wraps a loaded bundle: preprocessing exactly as in evaluation, calibrated (and test-time-augmented)
    probabilities, P(malignant). An ensemble bundle's probabilities are the mean of its members'.

    `tta` overrides the number of test-time-augmentation views the bundle was validated with (its card's
    `inference.tta`); calibration and the operating threshold were fitted with the card's own setting.
    A bundle with an `ood` block also gives an out-of-distribution score per image (`predict_with_ood`).
    `engine` picks the network: `auto` runs a bundle's exported ONNX file under ONNX Runtime when it has one (the
    validated int8 file first), else the eager network; `eager`, `onnx` and `int8` force one (pipelines.export).
    Grad-CAM and training always use the eager network (`bundle.model`).
    """

    def __init__(
        self, bundle: Bundle, limits: ImageLimits | None = None, batch_size: int = 32, tta: int | None = None,
        engine: str = "auto",
    ) -> None:
        self.bundle = bundle
        self.class_names = bundle.class_names
        self.members = [_Member(member, tta, engine) for member in (bundle.members or [bundle])]
        self.engine = self.members[0].engine
        self.transform = self.members[0].transform
        self.tta = max(member.tta for member in self.members)
        self.limits = limits or ImageLimits(min_side=int(bundle.card.get("min_input_side", 32)))
        self.batch_size = batch_size
        self.device = self.members[0].device
        self._lock = threading.Lock()  # one forward at a time per model: safe under Gradio's thread pool
        present = [c for c in bundle.malignant_classes if c in self.class_names]
        self.malignant_index = [self.class_names.index(c) for c in present]
        self.ood = detector_of(bundle)  # None when the card has no `ood` block
        # An ensemble's own calibration: one temperature on the log of its members' mean probability (see
        # pipelines.ensemble); a single network's `calibration` block is its member's and is applied above.
        self.combined_calibration = bundle.card.get("calibration") if bundle.members else None

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu", tta: int | None = None,
                  engine: str = "auto") -> "Predictor":
        """Load the bundle at `path` and wrap it."""
        return cls(load_bundle(path, device=device), tta=tta, engine=engine)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, C) calibrated class probabilities for RGB images."""
        return self._predict(images, with_ood=False)[0]

    def predict_with_ood(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """((N, C) calibrated probabilities, (N,) out-of-distribution scores, or None when the bundle has no `ood`
        block). One forward gives both: the score reads the first member's first view (the un-augmented crop)."""
        return self._predict(images, with_ood=self.ood is not None)

    def ood_flags(self, scores: np.ndarray | None) -> np.ndarray | None:
        """(N,) True where a score is above the card's threshold; None when there are no scores."""
        return None if scores is None or self.ood is None else self.ood.flags(scores)

    @torch.inference_mode()
    def _predict(self, images: Sequence[Image.Image], with_ood: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32), np.zeros(0) if with_ood else None
        outputs, scores = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            probs = []
            for index, member in enumerate(self.members):
                batch = torch.stack([member.transform(im) for im in chunk]).to(member.device)
                batch = batch.contiguous(memory_format=member.layout)
                score_here = with_ood and index == 0
                with self._lock:
                    logits, features = member.forward(batch, score_here and self.ood.block["method"] != "energy")
                if score_here:
                    scores.append(self.ood.score(features, logits[:, 0].cpu().numpy()))
                probs.append(calibrated_probs(logits.cpu().numpy(), member.calibration))
            outputs.append(combine_members(probs, self.combined_calibration).astype(np.float32))
        return np.concatenate(outputs), np.concatenate(scores) if with_ood else None

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
