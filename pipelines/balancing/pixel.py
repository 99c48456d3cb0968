"""Pixel-space SMOTE for small images (<= 64 px): synthetic training images by interpolating raw pixels, with a
contact sheet to look at them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.balancing.resampling import FeatureResampler
from pipelines.balancing.settings import load_balancing_config
from pipelines.config import BalancingConfig
from pipelines.training.samplers import class_counts

__all__ = ["contact_sheet", "pixel_smote"]

log = logging.getLogger(__name__)

ROW_COLUMNS = ["image_id", "path", "label", "group", "split", "source"]


def _pixel_config(config: BalancingConfig | dict[str, Any] | None) -> BalancingConfig:
    config = load_balancing_config(config)
    if config.space != "pixel":
        config = load_balancing_config({**config.model_dump(), "space": "pixel"})
    return config


def _train_pixels(train: pd.DataFrame, class_names: list[str], size: int) -> np.ndarray:
    """(N, size * size * 3) uint8 pixels of the training images, resized and centre-cropped as for evaluation."""
    from tqdm.auto import tqdm

    from pipelines.data import ImageDataset
    from pipelines.transforms import EvalTransform

    geometry = EvalTransform(size, [0.0] * 3, [1.0] * 3)
    dataset = ImageDataset(train, class_names, lambda im: im)
    return np.stack([np.asarray(geometry.resize_crop(dataset.image(i))).reshape(-1)
                     for i in tqdm(range(len(dataset)), desc="loading training images", leave=False)])


def _write_images(pixels: np.ndarray, labels: np.ndarray, size: int, folder: Path) -> pd.DataFrame:
    """One PNG per synthetic sample in `folder`; their manifest rows (split=train, source=synthetic)."""
    from PIL import Image

    rows = []
    for i, (flat, label) in enumerate(zip(pixels, labels, strict=True)):
        image_id = f"pixsmote-{label}-{i:05d}"
        path = folder / f"{image_id}.png"
        Image.fromarray(np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(size, size, 3)).save(path)
        rows.append({"image_id": image_id, "path": str(path.resolve()), "label": str(label), "group": image_id,
                     "split": "train", "source": "synthetic"})
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def pixel_smote(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    config: BalancingConfig | dict[str, Any] | None = None,
    split: str = "train",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Oversample the training images by interpolating raw pixels at `pixel_size` (<= 64 px); returns the manifest
    with the synthetic rows appended (split=train, source=synthetic) and a report; writes PNGs and a contact sheet."""
    from pipelines.manifest import append_train_rows

    config = _pixel_config(config)
    if split != "train":
        raise ValueError(f"refusing to resample split '{split}': resampling touches the training split only")
    size = config.pixel_size
    train = manifest[manifest.split == "train"]
    if train.empty:
        raise ValueError("manifest has no split=train rows to resample")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    class_names = sorted(train.label.unique())
    pixels = _train_pixels(train, class_names, size)
    resampler = FeatureResampler(config.method, config.target_ratio, config.k_neighbors, config.seed)
    new_x, new_y = resampler.fit_resample(pixels.astype(np.float32), train.label.to_numpy())
    added = _write_images(new_x[len(pixels):], new_y[len(pixels):], size, out_dir / "images")
    if "malignant" in manifest.columns and len(added):
        malignant = set(manifest.loc[manifest.malignant.astype(str).isin(["1", "1.0", "True"]), "label"])
        added["malignant"] = added.label.isin(malignant).astype(int)
    result = append_train_rows(manifest, added)
    sheet = contact_sheet(added, out_dir / "contact_sheet.png", config.contact_sheet_per_class, size)
    report = {
        "method": config.method, "space": "pixel", "pixel_size": size, "target_ratio": config.target_ratio,
        "seed": config.seed, "synthetic_images": len(added), "contact_sheet": str(sheet) if sheet else None,
        "train_counts_before": dict(zip(class_names, class_counts(train.label, class_names), strict=True)),
        "train_counts_after": dict(zip(class_names, class_counts(result.label[result.split == "train"], class_names),
                                       strict=True)),
    }
    (out_dir / "pixel_smote.json").write_text(json.dumps(report, indent=2))
    log.info("pixel-space %s: %d synthetic %d px images in %s", config.method, len(added), size, out_dir / "images")
    return result, report


def contact_sheet(rows: pd.DataFrame, path: Path, per_class: int = 8, size: int = 32, scale: int = 2) -> Path | None:
    """A PNG grid: one row per class (its name on the left), up to `per_class` of its images, enlarged `scale` x."""
    from PIL import Image, ImageDraw

    if rows.empty:
        return None
    classes = sorted(rows.label.unique())
    cell, label_width, pad = size * scale, 70, 4
    sheet = Image.new("RGB", (label_width + per_class * (cell + pad) + pad, len(classes) * (cell + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(classes):
        top = pad + r * (cell + pad)
        draw.text((pad, top + cell // 2 - 6), name, fill="black")
        for c, file in enumerate(rows.path[rows.label == name].head(per_class)):
            image = Image.open(file).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(image, (label_width + pad + c * (cell + pad), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
