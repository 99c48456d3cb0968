"""Image-classifier training from a run config: data, model, objective, `fit`, calibration, bundle and report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.registry import architecture_kwargs
from pipelines.config import ModelConfig, RunConfig, TrainSettings
from pipelines.ood import OODDetector
from pipelines.training.accelerator import make_accelerator
from pipelines.training.forward import ForwardFn, channels_last_forward, default_forward, mixing_loss_forward
from pipelines.training.loop import FitResult, StepLoss, fit
from pipelines.training.losses import build_loss
from pipelines.training.samplers import build_sampler, class_counts

__all__ = ["fit_training_ood", "train_from_config"]

log = logging.getLogger(__name__)


@dataclass
class _Data:
    """A run's manifest split into what training reads: train (every row), val and test (real rows only)."""

    manifest_path: Path
    class_names: list[str]
    malignant: list[str]
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    counts: list[int]  # training images per class, in class order


@dataclass
class _Inputs:
    """The datasets and loaders of one training run, with the preprocessing they share."""

    normalization: dict[str, Any]
    color_constancy: str | None
    evaluate: Any  # the deterministic (evaluation) transform
    cache_dir: Path | None
    train_ds: Any
    val_ds: Any
    train_loader: DataLoader
    val_loader: DataLoader


def _load_data(config: RunConfig, manifest_path: Path) -> _Data:
    """Read the manifest and check it can train: train and val rows, known malignant classes, no empty class."""
    from pipelines.manifest import SPLITS, class_names_of, read_manifest

    manifest = read_manifest(manifest_path)
    for split in ("train", "val"):
        if not (manifest.split == split).any():
            raise ValueError(f"manifest '{manifest_path}' has no '{split}' rows; run the split stage first")
    class_names = class_names_of(manifest[manifest.split.isin(SPLITS)])
    unknown = [c for c in config.data.malignant_classes if c not in class_names]
    # A name the user wrote that is not a class is an error (a typo would silently drop a class from the malignant
    # AUC and the referral threshold); the default list applies to the classes a dataset has.
    if unknown and "malignant_classes" in config.data.model_fields_set:
        raise ValueError(f"data.malignant_classes names {', '.join(repr(c) for c in unknown)}, which is not a class "
                         f"of manifest '{manifest_path}' (classes: {', '.join(class_names)})")
    train_df = manifest[manifest.split == "train"]
    counts = class_counts(train_df.label, class_names)
    missing = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if missing:
        raise ValueError(f"classes {missing} have no training images in '{manifest_path}'")
    real = manifest.source == "real"
    return _Data(
        manifest_path=manifest_path,
        class_names=class_names,
        malignant=[c for c in config.data.malignant_classes if c in class_names],
        train=train_df,
        val=manifest[(manifest.split == "val") & real],
        test=manifest[(manifest.split == "test") & real],
        counts=counts,
    )


def _build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The configured network with `num_classes` outputs."""
    from models.registry import build_model

    return build_model(
        model_cfg.name,
        num_classes,
        model_cfg.img_size,
        checkpoint=model_cfg.checkpoint,
        pretrained=model_cfg.pretrained,
        **({"pretrained_path": model_cfg.pretrained_path} if model_cfg.pretrained_path else {}),
        **model_cfg.kwargs,
    )


def _build_inputs(data: _Data, model_cfg: ModelConfig, settings: TrainSettings, run_dir: Path) -> _Inputs:
    """Datasets (augmented train, deterministic val/test) and the train loader with the configured sampler."""
    from models.registry import default_normalization
    from pipelines.data import ImageDataset
    from pipelines.transforms import eval_transform, train_transform

    norm = default_normalization(model_cfg.name)
    constancy = None if model_cfg.color_constancy == "none" else model_cfg.color_constancy
    cache_dir = run_dir / "image_cache" if settings.cache_images else None
    train_ds = ImageDataset(
        data.train, data.class_names, train_transform(model_cfg.img_size, **norm, color_constancy=constancy),
        seed=settings.seed, cache_dir=cache_dir,
    )
    evaluate = eval_transform(model_cfg.img_size, **norm, color_constancy=constancy)
    val_ds = ImageDataset(data.val, data.class_names, evaluate, cache_dir=cache_dir)
    sampler = build_sampler(train_ds.labels, len(data.class_names), settings.sampler, settings.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=settings.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=settings.num_workers,
        drop_last=len(train_ds) > settings.batch_size,
        generator=torch.Generator().manual_seed(settings.seed),
        persistent_workers=settings.num_workers > 0,
    )
    val_loader = DataLoader(val_ds, batch_size=settings.batch_size * 2, num_workers=settings.num_workers)
    return _Inputs(norm, constancy, evaluate, cache_dir, train_ds, val_ds, train_loader, val_loader)


def _objective(settings: TrainSettings, counts: list[int], device: torch.device
               ) -> tuple[nn.Module, ForwardFn, StepLoss | None]:
    """(loss, forward, loss_forward): the configured cost-sensitive loss, the batch layout and mixup / cutmix."""
    loss_fn = build_loss(
        settings.loss,
        counts,
        settings.class_weighting,
        settings.effective_beta,
        settings.focal_gamma,
        settings.logit_tau,
        settings.label_smoothing,
    ).to(device)
    forward = channels_last_forward(default_forward) if settings.channels_last else default_forward
    loss_forward = None
    if settings.mixup_alpha > 0 or settings.cutmix_alpha > 0:
        loss_forward = mixing_loss_forward(loss_fn, settings.mixup_alpha, settings.cutmix_alpha, settings.mix_prob,
                                           settings.seed, settings.channels_last)
    return loss_fn, forward, loss_forward


def fit_training_ood(model: nn.Module, train_df: pd.DataFrame, val_ds: Any, class_names: list[str], transform: Any,
                     seed: int = 0) -> OODDetector | None:
    """The bundle's out-of-distribution score: Mahalanobis on the head's input features of a stratified subsample of
    at most `MAX_TRAIN_IMAGES` real training images (evaluation crop), threshold on the validation split; None for a
    network without a linear head."""
    from pipelines.data import ImageDataset
    from pipelines.ood import MAX_TRAIN_IMAGES, feature_layer, fit_model_ood, stratified_subsample

    if feature_layer(model) is None:
        log.info("no out-of-distribution score: %s has no linear head", type(model).__name__)
        return None
    real = train_df[train_df.source == "real"]
    rows = real.iloc[stratified_subsample(real.label.to_numpy(), MAX_TRAIN_IMAGES, seed)]
    fitted_on = (f"{len(rows)} real training images (stratified subsample of at most {MAX_TRAIN_IMAGES}) for the "
                 f"class means and covariance; the validation split ({len(val_ds)} images) for the threshold")
    return fit_model_ood(model, ImageDataset(rows, class_names, transform), val_ds, fitted_on=fitted_on)


def _source_counts(train_df: pd.DataFrame, class_names: list[str]) -> dict[str, dict[str, int]]:
    """Training images per class and source (real / synthetic)."""
    by_source = {src: class_counts(train_df.label[train_df.source == src], class_names)
                 for src in ("real", "synthetic")}
    return {name: {src: by_source[src][i] for src in by_source} for i, name in enumerate(class_names)}


def _training_block(config: RunConfig, result: FitResult, images: int, source_counts: dict[str, Any],
                    num_processes: int) -> dict[str, Any]:
    """The card's `training` section: what was trained on, how, and every trainer setting as configured."""
    settings, model_cfg = config.training, config.model
    block: dict[str, Any] = {
        "images": images,
        "train_counts": source_counts,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "epochs_planned": result.planned_epochs,
        "train_minutes": result.train_minutes,
        "loss": settings.loss,
        "class_weighting": settings.class_weighting,
        "sampler": settings.sampler,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "weight_decay": settings.weight_decay,
        "ema_decay": settings.ema_decay,
        "mixup_alpha": settings.mixup_alpha,
        "cutmix_alpha": settings.cutmix_alpha,
        "mixed_precision": settings.mixed_precision,
        "pretrained": model_cfg.pretrained,
        "seed": settings.seed,
        "data": Path(config.data.root).name if config.data.format != "manifest" else Path(
            config.data.manifest or "").name,
        "optimizer": "adamw",
        "scheduler": "linear warm-up over warmup_epochs, then cosine decay to 0 at epochs_planned",
        "img_size": model_cfg.img_size,
        "model_checkpoint": model_cfg.checkpoint,
        "num_processes": num_processes,  # the effective batch is batch_size x num_processes
    }
    # Every other trainer setting (epochs, warm-up, patience, budget, loss parameters, mix_prob, ...), as configured.
    block.update({k: v for k, v in settings.model_dump(mode="json").items() if k not in block})
    return block


def _write_training_report(scores: Any, data: _Data, result: FitResult, source_counts: dict[str, Any],
                           model_name: str, report_dir: Path) -> None:
    """Plots, reliability comparison and `report.md` on the test split (the validation split when there is none)."""
    from pipelines.evaluation import save_plots, save_reliability_comparison, write_report

    extra = {
        "data": {"train_counts": source_counts},
        "history": result.history,
        "train_images_per_s": result.train_images_per_s,
        "validation": scores.val_metrics,
        "calibration": scores.calibration,
        "tta": scores.tta,
    }
    if scores.test_metrics is not None:
        extra["inference_images_per_s"] = scores.inference_images_per_s
        split, labels, probs, raw, metrics = ("test", scores.test_labels, scores.test_probs,
                                              scores.test_probs_uncalibrated, scores.test_metrics)
        title = f"{model_name} on the held-out test split"
    else:
        split, labels, probs, raw, metrics = ("validation", scores.val_labels, scores.val_probs,
                                              scores.val_probs_uncalibrated, scores.val_metrics)
        title = f"{model_name} on the validation split"
    save_plots(labels, probs, data.class_names, data.malignant, report_dir)
    save_reliability_comparison(labels, raw, probs, report_dir / "reliability_calibration.png", f"{split} split")
    write_report(metrics, report_dir, title, extra)


def _calibrate_and_ship(config: RunConfig, run_dir: Path, data: _Data, inputs: _Inputs, result: FitResult,
                        num_processes: int) -> Path:
    """Calibrate on validation, choose the referral threshold, fit the OOD score, write the report and the bundle."""
    from models.bundle import save_bundle
    from pipelines.data import ImageDataset
    from pipelines.evaluation import add_score_intervals, write_training_images
    from pipelines.evaluation.scoring import calibrate_and_score
    from pipelines.manifest import manifest_sha256
    from pipelines.provenance import code_version

    settings, model_cfg = config.training, config.model
    model = result.model.to(memory_format=torch.contiguous_format)
    report_dir = run_dir / "report"
    test_ds = (ImageDataset(data.test, data.class_names, inputs.evaluate, cache_dir=inputs.cache_dir)
               if len(data.test) else None)
    scores = calibrate_and_score(model, inputs.val_ds, test_ds, data.class_names, data.malignant,
                                 settings.tta, settings.calibration, settings.target_sensitivity,
                                 logits_out=report_dir / "logits.npz")
    add_score_intervals(scores, data.class_names, data.malignant)  # 95 % bootstrap intervals for card and report
    ood = fit_training_ood(model, data.train, inputs.val_ds, data.class_names, inputs.evaluate, settings.seed)
    source_counts = _source_counts(data.train, data.class_names)
    card: dict[str, Any] = {
        "task": "image",
        "architecture": {"name": model_cfg.name, "kwargs": architecture_kwargs(model, model_cfg.kwargs)},
        "class_names": data.class_names,
        "malignant_classes": data.malignant,
        "input_size": model_cfg.img_size,
        "normalization": inputs.normalization,
        "preprocessing": {"color_constancy": inputs.color_constancy},
        "inference": {"tta": scores.tta},
        "calibration": scores.calibration,
        "operating_threshold": scores.threshold["threshold"] if scores.threshold else None,
        "threshold_metrics": scores.threshold,
        "metrics": scores.card_metrics(),
        "manifest_sha256": manifest_sha256(data.manifest_path),
        "training": _training_block(config, result, len(inputs.train_ds), source_counts, num_processes),
        "code_version": code_version(),
    }
    _write_training_report(scores, data, result, source_counts, model_cfg.name, report_dir)
    card["metrics"]["train_images_per_s"] = result.train_images_per_s
    if ood is not None:
        card["ood"] = ood.block
    bundle_dir = save_bundle(run_dir / "bundle", model.cpu(), card, ood=ood.torch_tensors() if ood else None)
    write_training_images(bundle_dir, data.train[data.train.source == "real"])
    log.info("bundle written to %s, report to %s", bundle_dir, report_dir / "report.md")
    return bundle_dir


def train_from_config(config: RunConfig, run_dir: str | Path, manifest_path: str | Path | None = None) -> Path:
    """Train the configured image classifier on a run's manifest; calibrate it; write the bundle and the report."""
    run_dir = Path(run_dir)
    data = _load_data(config, Path(manifest_path or run_dir / "manifest.csv"))
    settings, model_cfg = config.training, config.model
    accelerator = make_accelerator(settings)
    model = _build_model(model_cfg, len(data.class_names))
    inputs = _build_inputs(data, model_cfg, settings, run_dir)
    loss_fn, forward, loss_forward = _objective(settings, data.counts, accelerator.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info("training %s on %d images (%s), validating on %d", model_cfg.name, len(inputs.train_ds),
             dict(zip(data.class_names, data.counts, strict=True)), len(inputs.val_ds))
    result = fit(model, inputs.train_loader, inputs.val_loader, loss_fn, settings, run_dir, accelerator,
                 forward=forward, loss_forward=loss_forward)
    if not accelerator.is_main_process:
        return run_dir / "bundle"
    return _calibrate_and_ship(config, run_dir, data, inputs, result, accelerator.num_processes)
