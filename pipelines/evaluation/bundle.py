"""`lesionlab evaluate`: a saved bundle scored on a manifest or a dataset folder, with its report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.config import BOOTSTRAP_RESAMPLES
from pipelines.evaluation.bootstrap import bootstrap_intervals
from pipelines.evaluation.leakage import check_training_overlap
from pipelines.evaluation.metrics import compute_metrics
from pipelines.evaluation.report import save_plots, write_report

__all__ = ["evaluate_bundle"]

log = logging.getLogger(__name__)


def evaluate_bundle(
    bundle_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    split: str | None = "test",
    tta: int | None = None,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    engine: str = "auto",
) -> dict:
    """Evaluate a saved bundle on a manifest (its `split` rows, or all rows) or a dataset folder; write the report.

    Probabilities are the bundle's calibrated ones, with its own test-time augmentation unless `tta` overrides it.
    The report gives 95 % bootstrap intervals (`n_boot` resamples; 0: none) and warns when evaluated images were
    training images of the bundle (`check_training_overlap`); the returned metrics carry the same `intervals`.
    """
    import pandas as pd

    from pipelines.config import DataConfig
    from pipelines.images import ImageError, load_image
    from pipelines.manifest import read_dataset, read_manifest
    from pipelines.prediction import Predictor

    data = Path(data)
    if data.is_file():
        manifest = read_manifest(data)
        if split and (manifest.split == split).any():
            manifest = manifest[manifest.split == split]
    elif data.is_dir():
        layout = "ham10000" if (data / "metadata.csv").is_file() else "folders"
        manifest = read_dataset(DataConfig(format=layout, root=str(data)), check_malignant=False)
    else:
        raise FileNotFoundError(f"evaluation data '{data}' is neither a manifest CSV nor a dataset folder")
    manifest = manifest.reset_index(drop=True)
    predictor = Predictor.from_path(bundle_dir, tta=tta, engine=engine)
    unknown = sorted(set(manifest.label) - set(predictor.class_names))
    if unknown:
        raise ValueError(
            f"data has labels {unknown} that bundle '{bundle_dir}' does not know ({predictor.class_names})"
        )
    card = predictor.bundle.card
    overlap = check_training_overlap(bundle_dir, card, manifest, "evaluated", [data] if data.is_file() else [])
    images, kept, errors = [], [], []
    for i, path in enumerate(manifest.path):
        try:
            images.append(load_image(path, predictor.limits))
            kept.append(i)
        except ImageError as err:
            log.warning("skipped: %s", err)
            errors.append(err)
    rows = manifest.iloc[kept]
    probs = predictor.predict(images).astype(np.float64)
    table = predictor.table(rows.image_id.astype(str).tolist(), probs)
    y_true = np.array([predictor.class_names.index(label) for label in rows.label], dtype=np.int64)
    malignant, threshold = predictor.bundle.malignant_classes, predictor.bundle.operating_threshold
    metrics = compute_metrics(y_true, probs, predictor.class_names, malignant, threshold)
    if len(y_true):
        intervals = bootstrap_intervals(y_true, probs, predictor.class_names, malignant, threshold, n_boot)
        if intervals is not None:
            metrics["intervals"] = intervals
    out_dir = Path(out_dir)
    save_plots(y_true, probs, predictor.class_names, malignant, out_dir)
    write_report(
        metrics, out_dir, f"Evaluation of {bundle_dir} on {data}",
        {"skipped_images": [str(e) for e in errors], "tta": predictor.tta, "training_overlap": overlap,
         "calibration": card.get("calibration")},
    )
    pd.DataFrame(table).to_csv(out_dir / "predictions.csv", index=False)
    return metrics
