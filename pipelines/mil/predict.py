"""Prediction with a MIL bundle: one slide's probabilities and patch attention, one row per slide for a folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipelines.bags import SLIDE_SUFFIXES, Bag, load_bag
from pipelines.calibration import calibrated_probs
from pipelines.config import TilingSettings
from pipelines.images import IMAGE_SUFFIXES
from pipelines.mil.features import embed_patches

__all__ = ["BagPrediction", "list_slides", "predict_bag", "predict_slides", "tiling_of"]

log = logging.getLogger(__name__)


@dataclass
class BagPrediction:
    """One slide's prediction: class probabilities and the attention weight of every patch."""

    slide_id: str
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,), sums to 1
    bag: Bag


def tiling_of(bundle) -> TilingSettings:
    """The tiling settings a MIL bundle was trained with."""
    if bundle.card.get("task") != "mil":
        raise ValueError(f"bundle '{bundle.path}' is not a MIL bundle (card task is {bundle.card.get('task')!r})")
    return TilingSettings.model_validate(bundle.card.get("tiling", {}))


@torch.inference_mode()
def predict_bag(bundle, bag: Bag, batch_size: int = 64) -> BagPrediction:
    """Run a MIL bundle on one tiled slide; patches go through the encoder `batch_size` at a time, so memory
    grows with the batch, not with the number of patches."""
    norm = bundle.card["normalization"]
    model = bundle.model
    features = embed_patches(model.encoder, bag.patches, bundle.input_size, norm["mean"], norm["std"], batch_size)
    device = next(model.parameters()).device
    output = model(features.unsqueeze(0).to(device), return_all=True)
    probs = calibrated_probs(output.logits.float().cpu().numpy(), bundle.card.get("calibration"))[0]
    return BagPrediction(bag.slide_id, probs, output.attention[0].float().cpu().numpy(), bag)


def _prediction_row(bundle, prediction: BagPrediction) -> dict[str, Any]:
    names = bundle.class_names
    row: dict[str, Any] = {"image_id": prediction.slide_id, "pred_label": names[int(prediction.probs.argmax())]}
    row.update({f"prob_{c}": float(p) for c, p in zip(names, prediction.probs)})
    malignant = [names.index(c) for c in bundle.malignant_classes if c in names]
    row["prob_malignant"] = float(prediction.probs[malignant].sum()) if malignant else float("nan")
    row["n_patches"] = len(prediction.bag)
    return row


def predict_slides(
    bundle, images: Sequence[str | Path | Image.Image] | str | Path, errors: list[str] | None = None
) -> pd.DataFrame:
    """One row per slide: image_id, pred_label, prob_<class>..., prob_malignant, n_patches.

    `images` is a list of slides (image files, whole-slide files, folders of patches, PIL images) or a folder of
    them (each file is a slide; each sub-folder is one case's patches). With an `errors` list, an unreadable or
    blank slide is skipped and its message appended there; without one, it raises.
    """
    if isinstance(bundle, (str, Path)):
        from models.bundle import load_bundle

        bundle = load_bundle(bundle)
    settings = tiling_of(bundle)
    sources = list_slides(images) if isinstance(images, (str, Path)) else list(images)
    rows = []
    for i, source in enumerate(sources):
        slide_id = Path(source).stem if isinstance(source, (str, Path)) else f"image_{i}"
        try:
            bag = load_bag(source, settings, slide_id)
        except (ValueError, OSError) as err:  # ImageError is a ValueError
            if errors is None:
                raise
            log.warning("skipped slide %s: %s", slide_id, err)
            errors.append(str(err))
            continue
        rows.append(_prediction_row(bundle, predict_bag(bundle, bag)))
    # A class literally named "malignant" already gives the prob_malignant column; dict.fromkeys drops the repeat.
    columns = ["image_id", "pred_label", *[f"prob_{c}" for c in bundle.class_names], "prob_malignant", "n_patches"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


def list_slides(source: str | Path) -> list[Path]:
    """Slides in a folder (files and patch sub-folders) or listed in a CSV (`path` or `image` column)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if not p.name.startswith("."))
        slides = [p for p in files if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES | SLIDE_SUFFIXES]
        if not slides:
            raise FileNotFoundError(f"folder '{source}' holds no slides (image files or folders of patches)")
        return slides
    if source.is_file() and source.suffix.lower() == ".csv":
        from pipelines.prediction import paths_from_csv

        return paths_from_csv(source, "slides")
    raise FileNotFoundError(f"'{source}' is neither a folder of slides nor a CSV listing them")
