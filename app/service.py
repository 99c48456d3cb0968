"""The service behind the web app: the loaded models, the input limits and what one request computes.

Nothing here knows about the page: `app.handlers` turns requests into calls of `LesionService`, `app.layout` draws
the page, `app.server` starts it. Every model is loaded once; a request only reads it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.explain import Explainer
from app.janitor import OUTPUT_PREFIX, FileJanitor, scratch_dir
from app.readout import abcd_readout, outline_image
from app.settings import ServeSettings
from app.wording import (
    class_name,
    explanation_markdown,
    ood_warnings,
    performance_markdown,
    probabilities_markdown,
    probability_text,
    referral_decision,
    referral_html,
    scope_warnings,
    warnings_html,
)
from models.bundle import Bundle, load_bundle, read_card
from pipelines.images import ImageError, load_image
from pipelines.prediction import Predictor

__all__ = [
    "LesionService",
    "ServedModel",
    "batch_display",
    "discover_bundles",
    "health",
    "load_models",
]

log = logging.getLogger(__name__)


def discover_bundles(models_dir: str | Path) -> dict[str, Path]:
    """Bundle folders by name: `models_dir` itself if it is a bundle, else its sub-folders holding a card.json."""
    models_dir = Path(models_dir)
    if (models_dir / "card.json").is_file():
        return {models_dir.name: models_dir}
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models folder '{models_dir}' does not exist; expected a folder of model bundles")
    found = {p.name: p for p in sorted(models_dir.iterdir()) if p.is_dir() and (p / "card.json").is_file()}
    if not found:
        raise FileNotFoundError(
            f"no model bundle in '{models_dir}'; expected a bundle folder (weights.safetensors + card.json) "
            "or a folder of such bundles"
        )
    return found


@dataclass
class ServedModel:
    """One image-classification bundle, loaded once: its predictor and explainer share nothing mutable."""

    name: str
    bundle: Bundle
    predictor: Predictor
    explainer: Explainer

    @property
    def card(self) -> dict[str, Any]:
        """The bundle's card (read-only by convention: every request shares it)."""
        return self.bundle.card


def load_models(models_dir: str | Path, settings: ServeSettings) -> tuple[dict[str, ServedModel], dict[str, Bundle]]:
    """Load every bundle in `models_dir` once: (image classifiers by name, MIL bundles by name)."""
    images: dict[str, ServedModel] = {}
    mil: dict[str, Bundle] = {}
    for name, path in discover_bundles(models_dir).items():
        card = read_card(path)
        bundle = load_bundle(path)
        if card.get("task", "image") == "mil":
            mil[name] = bundle
            continue
        limits = settings.limits(min_side=int(card.get("min_input_side", 32)))
        predictor = Predictor(bundle, limits=limits, tta=settings.tta, engine=settings.engine)
        images[name] = ServedModel(name, bundle, predictor, Explainer(bundle))
        log.info("loaded model '%s' (%s, %d px, %d classes, %s)", name, card["architecture"]["name"],
                 bundle.input_size, len(bundle.class_names), predictor.engine)
    return images, mil


@dataclass
class LesionService:
    """Everything a request needs: the loaded models, the input limits and the file janitor (thread-safe)."""

    models: dict[str, ServedModel]
    settings: ServeSettings
    janitor: FileJanitor
    mil_bundles: dict[str, Bundle] = field(default_factory=dict)
    output_dir: Path = field(default_factory=lambda: scratch_dir(OUTPUT_PREFIX))

    def model(self, name: str | None) -> ServedModel:
        """The served model called `name` (the first one when empty)."""
        if not name:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ValueError(f"unknown model '{name}'; expected one of {sorted(self.models)}")
        return self.models[name]

    def model_versions(self) -> dict[str, str | None]:
        """The version of every served model (image and MIL) by name, as the metrics and the audit log name them."""
        versions = {name: bundle.card.get("model_version") for name, bundle in self.mil_bundles.items()}
        return {**versions, **{name: model.card.get("model_version") for name, model in self.models.items()}}

    def decode(self, path: str | Path, model: ServedModel) -> Image.Image:
        """Decode an uploaded file with the shared safe decoder (limits, EXIF orientation, mode conversion)."""
        path = Path(path)
        if not path.is_file():
            raise ImageError(
                f"the uploaded file '{path.name}' is no longer on the server (uploads are deleted after analysis); "
                "please upload it again"
            )
        return load_image(path, model.predictor.limits, name=path.name)

    def analyse(self, image: Image.Image, model: ServedModel) -> dict[str, Any]:
        """Probabilities, malignancy vs threshold, explanation heat-map and ABCD readout for one RGB image."""
        start = time.perf_counter()
        probs, ood_scores = model.predictor.predict_with_ood([image])
        probs = probs[0]
        p_malignant = float(model.predictor.malignant_probability(probs[None])[0])
        predicted = int(probs.argmax())
        explanation = model.explainer.explain(image, predicted)
        readout, mask = abcd_readout(image)
        card = model.card
        threshold = card.get("operating_threshold")
        p_value = None if np.isnan(p_malignant) else p_malignant
        probabilities = {c: float(p) for c, p in zip(model.predictor.class_names, probs, strict=True)}
        explained = model.predictor.class_names[predicted]
        decision = referral_decision(p_value, card)
        warnings = scope_warnings(*image.size, model.bundle.input_size)
        ood = None
        if ood_scores is not None:
            score, flagged = float(ood_scores[0]), bool(model.predictor.ood_flags(ood_scores)[0])
            ood = {"score": score, "threshold": model.predictor.ood.threshold, "flagged": flagged}
            warnings += ood_warnings(score, model.predictor.ood.block)
        details = {
            "model": model.name,
            "model_version": card.get("model_version"),
            "referral": decision,
            "predicted": explained,
            "probabilities": probabilities,
            "prob_malignant": p_value,
            "operating_threshold": threshold,
            "above_threshold": None if threshold is None or p_value is None else bool(p_value >= threshold),
            "threshold_metrics": {k: v for k, v in (card.get("threshold_metrics") or {}).items()
                                  if k in ("sensitivity", "specificity")},
            "explanation": {"method": explanation.method, "class": explained},
            "abcd": readout,
            "warnings": warnings,
            "ood": ood,  # None for a bundle without an out-of-distribution score
        }
        log.info("analysed one image with '%s' in %.0f ms", model.name, 1000 * (time.perf_counter() - start))
        return {
            "details": details,
            "referral": warnings_html(warnings) + referral_html(p_value, card),
            "probabilities": probabilities_markdown(probabilities) + "\n\n" + performance_markdown(card),
            "heatmap": explanation.overlay(),
            "heat_note": explanation_markdown(class_name(explained), explanation.method),
            "outline": outline_image(image, mask),
        }

    def save_output(self, image: Image.Image, name: str) -> str:
        """Write an image for the browser as a PNG without metadata, under a fresh folder (deleted later)."""
        folder = Path(tempfile.mkdtemp(prefix="out-", dir=self.output_dir))
        path = folder / f"{name}.png"
        clean = Image.new("RGB", image.size)
        clean.paste(image.convert("RGB"))  # a new image: no EXIF, ICC profile or text chunks can come along
        clean.save(path, format="PNG")
        # Gradio copies it into its own cache when the request returns; its copy is deleted by `delete_cache`.
        self.janitor.delete_later(path, 120.0)
        return str(path)

    def batch(self, paths: Sequence[str | Path], model: ServedModel) -> tuple[Any, Path, list[str]]:
        """(table for the screen, CSV path, skipped-file messages); the CSV has the columns of `lesionlab predict`."""
        if len(paths) > self.settings.max_batch_files:
            raise ImageError(f"{len(paths)} files were sent; at most {self.settings.max_batch_files} per batch")
        images, ids, skipped = [], [], []
        for path in paths:
            try:
                images.append(self.decode(path, model))
                ids.append(Path(path).stem)
            except ImageError as err:
                skipped.append(str(err))
        probs, ood_scores = model.predictor.predict_with_ood(images)
        table = model.predictor.table(ids, probs)
        folder = Path(tempfile.mkdtemp(prefix="batch-", dir=self.output_dir))
        csv = folder / "lesionlab_predictions.csv"
        table.to_csv(csv, index=False, float_format="%.6f")
        self.janitor.delete_later(csv, self.settings.output_max_age_s)
        log.info("batch of %d files with '%s': %d predicted, %d skipped", len(paths), model.name, len(table),
                 len(skipped))
        shown = batch_display(table, model.predictor.class_names, model.card, model.predictor.ood_flags(ood_scores))
        return shown, csv, skipped


def batch_display(table: Any, class_names: Sequence[str], card: dict[str, Any], ood_flags: Any = None) -> Any:
    """The prediction table as the screen shows it: the referral first, percentages (one decimal, so the columns
    sort as numbers), full diagnosis names; with `ood_flags`, an `ood_flag` column (True: unlike the training
    images)."""
    import pandas as pd

    shown = pd.DataFrame({"image": table["image_id"]})
    p_malignant = table["prob_malignant"].astype(float)
    shown["referral"] = [referral_decision(None if np.isnan(p) else float(p), card) for p in p_malignant]
    shown["P(malignant) %"] = (100 * p_malignant).round(1)
    shown["most likely"] = [class_name(c) for c in table["pred_label"]]
    shown["its probability"] = [probability_text(float(table.loc[i, f"prob_{c}"]))
                                for i, c in zip(table.index, table["pred_label"], strict=True)]
    if ood_flags is not None:
        shown["ood_flag"] = [bool(flag) for flag in ood_flags]
    for c in class_names:
        shown[f"{class_name(c)} %"] = (100 * table[f"prob_{c}"].astype(float)).round(1)
    return shown


def health(service: LesionService) -> dict[str, Any]:
    """What GET /healthz answers: a tiny JSON with the status, the loaded models and the software version."""
    try:
        software = version("lesionlab")
    except PackageNotFoundError:
        software = "unknown"
    return {
        "status": "ok",
        "models": {name: model.card.get("model_version") for name, model in service.models.items()},
        "pathology_models": sorted(service.mil_bundles),
        "version": software,
    }
