"""Feature-space balancing of a trained bundle: embed -> resample the training embeddings -> re-train the head ->
re-calibrate -> a new bundle with its report."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.balancing.head import apply_prior_correction, embed_dataset, train_head
from pipelines.balancing.report import compare_heads, write_balancing_report
from pipelines.balancing.resampling import FeatureResampler, oversample_split
from pipelines.balancing.settings import load_balancing_config
from pipelines.config import BalancingConfig
from pipelines.training.losses import build_loss
from pipelines.training.samplers import class_counts

__all__ = ["balance_bundle"]

log = logging.getLogger(__name__)


@dataclass
class _Source:
    """The bundle being balanced and the manifest rows it is balanced on."""

    bundle: Any  # models.bundle.Bundle
    card: dict[str, Any]  # a copy, updated into the new bundle's card
    model: nn.Module
    class_names: list[str]
    malignant: list[str]
    rows: pd.DataFrame  # every training row, the real validation and test rows
    overlap: dict[str, Any] | None  # training images found among the validation and test rows


@dataclass
class _Table:
    """Embeddings and labels per split after resampling (train grown, val and test untouched)."""

    rows: pd.DataFrame
    features: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    train_counts: list[int]


def _load_source(bundle_dir: str | Path, manifest_path: str | Path) -> _Source:
    """Load the bundle and the rows training used; refuse what feature-space balancing cannot re-train."""
    from models.bundle import load_bundle
    from pipelines.evaluation import check_training_overlap
    from pipelines.manifest import SPLITS, read_manifest

    bundle = load_bundle(bundle_dir)
    card, model = copy.deepcopy(bundle.card), bundle.model
    if card.get("task", "image") != "image" or not isinstance(getattr(model, "head", None), nn.Linear):
        raise ValueError(f"bundle '{bundle_dir}' is not an image classifier with a linear head "
                         f"(task={card.get('task')}); feature-space balancing re-trains that head")
    class_names = list(card["class_names"])
    manifest = read_manifest(manifest_path)
    unknown = sorted(set(manifest.label) - set(class_names))
    if unknown:
        raise ValueError(f"manifest '{manifest_path}' has labels {unknown} the bundle does not know ({class_names})")
    # Same rows as training used: every training row, real validation and test rows.
    keep = (manifest.split == "train") | (manifest.split.isin(SPLITS) & (manifest.source == "real"))
    rows = manifest[keep].reset_index(drop=True)
    for split in ("train", "val"):
        if not (rows.split == split).any():
            raise ValueError(f"manifest '{manifest_path}' has no '{split}' rows; feature-space balancing needs both")
    # The validation and test rows choose the threshold and score the heads: they must not be training images.
    overlap = check_training_overlap(bundle_dir, bundle.card, rows[rows.split != "train"], "validation and test",
                                     [manifest_path])
    malignant = [c for c in card.get("malignant_classes", []) if c in class_names]
    return _Source(bundle, card, model, class_names, malignant, rows, overlap)


def _resampled_table(source: _Source, features: np.ndarray, config: BalancingConfig) -> _Table:
    """Oversample the training embeddings (method none: as they are); split features and labels per split."""
    from pipelines.manifest import SPLITS

    if config.method == "none":
        table, table_features = source.rows, features
    else:
        resampler = FeatureResampler(config.method, config.target_ratio, config.k_neighbors, config.seed)
        table, table_features = oversample_split(source.rows, features, resampler, "train", prefix=config.method)
    index = {name: i for i, name in enumerate(source.class_names)}
    masks = {split: (table.split == split).to_numpy() for split in SPLITS}
    return _Table(
        rows=table,
        features={split: table_features[masks[split]] for split in SPLITS},
        labels={split: np.array([index[c] for c in table.label[masks[split]]], dtype=np.int64) for split in SPLITS},
        train_counts=class_counts(table.label[masks["train"]], source.class_names),
    )


def _retrain_head(original: nn.Linear, table: _Table, config: BalancingConfig
                  ) -> tuple[nn.Linear, list[dict[str, float]]]:
    """cRT: a fresh (or the original) head trained on the resampled embeddings; optionally prior-corrected."""
    head = copy.deepcopy(original)
    if config.head_init == "reinit":
        torch.manual_seed(config.seed)
        head.reset_parameters()
    loss_fn = build_loss(config.head_loss, table.train_counts, config.class_weighting, config.effective_beta,
                         config.focal_gamma, config.logit_tau)
    head, history = train_head(
        head, table.features["train"], table.labels["train"], table.features["val"], table.labels["val"], loss_fn,
        config.head_epochs, config.head_lr, config.head_weight_decay, config.head_batch_size, config.sampler,
        config.seed,
    )
    if config.prior_correction:
        apply_prior_correction(head, np.asarray(table.train_counts, dtype=np.float64), config.prior_tau)
    return head, history


def _rescore(source: _Source, head: nn.Linear, transform: Any, sensitivity: float, logits_out: Path,
             n_boot: int) -> Any:
    """Put the new head in the model; calibrate on validation, choose the referral threshold, score test."""
    from pipelines.calibration import calibration_method_of
    from pipelines.data import ImageDataset
    from pipelines.evaluation import add_score_intervals
    from pipelines.evaluation.scoring import calibrate_and_score
    from pipelines.transforms import card_tta

    model, rows = source.model, source.rows
    model.head = head.to(next(model.parameters()).device)
    val_rows, test_rows = rows[rows.split == "val"], rows[rows.split == "test"]
    scores = calibrate_and_score(
        model, ImageDataset(val_rows, source.class_names, transform),
        ImageDataset(test_rows, source.class_names, transform) if len(test_rows) else None,
        source.class_names, source.malignant, card_tta(source.card), calibration_method_of(source.card), sensitivity,
        logits_out=logits_out,
    )
    add_score_intervals(scores, source.class_names, source.malignant, n_boot)
    return scores


def _balancing_block(config: BalancingConfig, source: _Source, table: _Table, history: list[dict[str, float]],
                     bundle_dir: str | Path) -> dict[str, Any]:
    """The card's and the report's `balancing` section: settings, selected epoch, class counts before and after."""
    names = source.class_names
    before = class_counts(source.rows.label[source.rows.split == "train"], names)
    return {
        "method": config.method, "space": "feature", "target_ratio": config.target_ratio,
        "k_neighbors": config.k_neighbors, "seed": config.seed, "head_init": config.head_init,
        "head_loss": config.head_loss, "class_weighting": config.class_weighting, "sampler": config.sampler,
        "head_epochs": config.head_epochs,
        "best_epoch": int(np.argmax([h["val_balanced_accuracy"] for h in history])) + 1,
        "prior_correction": ({"tau": config.prior_tau, "priors": table.train_counts} if config.prior_correction
                             else None),
        "train_counts_before": dict(zip(names, before, strict=True)),
        "train_counts_after": dict(zip(names, table.train_counts, strict=True)),
        "source_bundle": str(Path(bundle_dir).resolve()),
    }


def _save(source: _Source, scores: Any, balancing: dict[str, Any], bundle_dir: str | Path,
          manifest_path: str | Path, out_dir: str | Path) -> Path:
    """The new card (its own metrics and threshold; the source's metrics apart, with its hash) and the bundle."""
    from models.bundle import save_bundle
    from pipelines.evaluation import source_metrics
    from pipelines.manifest import manifest_sha256

    card, threshold = source.card, scores.threshold
    card.update({
        "operating_threshold": threshold["threshold"] if threshold else None,
        "threshold_metrics": threshold,
        "calibration": scores.calibration,
        "inference": {"tta": scores.tta},
        # Its own numbers; the source bundle's go apart, with its hash.
        "metrics": scores.card_metrics(),
        "source_metrics": source_metrics(bundle_dir, source.bundle.card),
        "manifest_sha256": manifest_sha256(manifest_path),
        "balancing": balancing,
    })
    card.pop("format_version", None)
    card.pop("versions", None)
    return save_bundle(out_dir, source.model.cpu(), card)


def balance_bundle(
    bundle_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    config: BalancingConfig | dict[str, Any] | None = None,
    target_sensitivity: float = 0.9,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Decoupled re-balancing of a trained image bundle: the backbone is kept, only the linear head is re-trained.

    Embeds the manifest's train, val and test rows with the bundle's backbone, oversamples the training embeddings
    (SMOTE family, training rows only), re-trains the head, optionally bakes in the prior correction, chooses the
    operating threshold on validation and writes a normal bundle to `out_dir`. Returns the report dict.
    """
    from pipelines.data import ImageDataset
    from pipelines.evaluation import BOOTSTRAP_RESAMPLES
    from pipelines.transforms import card_transform

    config = load_balancing_config(config)
    if config.space != "feature":
        raise ValueError("balance_bundle re-trains a bundle's head in feature space; use pixel_smote for space=pixel")
    source = _load_source(bundle_dir, manifest_path)
    n_boot = BOOTSTRAP_RESAMPLES if config.bootstrap is None else config.bootstrap
    report_dir = Path(report_dir) if report_dir else Path(out_dir) / "balancing_report"

    transform = card_transform(source.card)
    dataset = ImageDataset(source.rows, source.class_names, transform)
    features = embed_dataset(source.model, dataset, config.embed_batch_size,
                             desc=f"embedding {len(source.rows)} images")
    original_head = copy.deepcopy(source.model.head).float()
    table = _resampled_table(source, features, config)
    head, history = _retrain_head(original_head, table, config)
    # The before/after table compares the heads on the embeddings (one view, uncalibrated), with intervals and the
    # paired change; the bundle itself is re-calibrated below with its own test-time augmentation, and its card
    # shows those numbers.
    metrics = compare_heads(original_head, head, table.features, table.labels, source.class_names, source.malignant,
                            n_boot)
    sensitivity = config.target_sensitivity or target_sensitivity
    scores = _rescore(source, head, transform, sensitivity, report_dir / "logits.npz", n_boot)
    balancing = _balancing_block(config, source, table, history, bundle_dir)
    saved = _save(source, scores, balancing, bundle_dir, manifest_path, out_dir)
    report = {"bundle": str(saved), "balancing": balancing, "metrics": metrics, "threshold": scores.threshold,
              "bundle_metrics": source.card["metrics"], "training_overlap": source.overlap, "history": history}
    report["report"] = str(write_balancing_report(report, report_dir))
    log.info("balanced bundle written to %s (val balanced accuracy %.3f -> %.3f)", saved,
             metrics["val"]["before"]["balanced_accuracy"], metrics["val"]["after"]["balanced_accuracy"])
    return report
