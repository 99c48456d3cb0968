"""Pruning a model bundle: `lesionlab prune` and the `pruning` stage of `lesionlab run`.

`prune_bundle` reads the bundle and its manifest, scores the source bundle as it serves, prunes it to the FLOPs
target in prune -> fine-tune stages, re-fits the pruned net's calibration and referral threshold on validation,
and writes the pruned bundle (its card holds the channel plan) with `pruning_report.md`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.config import PruningConfig
from pipelines.pruning.data import balanced_calibration_rows, batchnorm_rows
from pipelines.pruning.finetune import distillation_for, fine_tune_settings, stage_fine_tuner, stage_train_loaders
from pipelines.pruning.measure import measure_model
from pipelines.pruning.report import accuracy_report, minority_classes_of, write_pruning_report
from pipelines.pruning.search import PruneResult, prune_to_flops
from pipelines.stage import StageOutputs

__all__ = ["fine_tune_control", "load_pruning_config", "prune_bundle", "run_pruning_stage", "served_probs"]

log = logging.getLogger(__name__)


def load_pruning_config(raw: dict[str, Any] | None) -> PruningConfig:
    """Validate a `pruning:` config section (unknown keys and out-of-range values are errors)."""
    from pipelines.config import stage_settings

    return stage_settings({"pruning": raw}, "pruning", PruningConfig)


def served_probs(model: nn.Module, dataset: Any, calibration: dict[str, Any] | None, tta: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of `model` on `dataset` as a bundle serves them: its test-time augmentation views,
    each calibrated, averaged (the predictor's recipe; `calibration` None and `tta` 1 give the plain softmax)."""
    from pipelines.calibration import calibrated_probs
    from pipelines.prediction import dataset_logits

    # On a copy: scoring runs in inference mode, and its layout changes would leave `model`'s parameters as
    # inference tensors that the fine-tuning after it cannot train.
    logits, labels = dataset_logits(copy.deepcopy(model), dataset, tta)
    return labels, calibrated_probs(logits, calibration)


def _json_copy(value: Any) -> Any:
    """A deep copy through JSON (cards are JSON)."""
    return json.loads(json.dumps(value, default=float))


@dataclass
class _Inputs:
    """What pruning a bundle reads: the bundle, its manifest's splits and the image sets drawn from them."""

    bundle: Any
    manifest: pd.DataFrame
    train: pd.DataFrame
    val: pd.DataFrame
    eval: pd.DataFrame
    evaluate: Any  # the bundle's deterministic transform
    calibration_rows: pd.DataFrame
    calibration: list[torch.Tensor]
    batchnorm: list[torch.Tensor]
    counts: list[int]
    minority: list[str]


def _image_batches(rows: pd.DataFrame, class_names: list[str], transform: Any, batch_size: int) -> list[torch.Tensor]:
    """The images of `rows`, transformed, as a list of batches."""
    from torch.utils.data import DataLoader

    from pipelines.data import ImageDataset

    return [x for x, _ in DataLoader(ImageDataset(rows, class_names, transform), batch_size=batch_size)]


def _read_inputs(bundle_dir: str | Path, manifest_path: str | Path, settings: PruningConfig) -> _Inputs:
    """Load the image bundle and its manifest, split it, draw the calibration and BatchNorm images."""
    from models.bundle import load_bundle
    from pipelines.manifest import read_manifest
    from pipelines.training import class_counts
    from pipelines.transforms import card_transform

    bundle = load_bundle(bundle_dir)
    if bundle.card.get("task", "image") != "image":
        raise ValueError(f"bundle '{bundle_dir}' is a {bundle.card.get('task')} model; pruning supports image "
                         "classifiers")
    class_names = bundle.class_names
    manifest = read_manifest(manifest_path)
    train = manifest[manifest.split == "train"]
    val = manifest[(manifest.split == "val") & (manifest.source == "real")]
    evaluated = manifest[(manifest.split == settings.eval_split) & (manifest.source == "real")]
    if val.empty:
        raise ValueError(f"manifest '{manifest_path}' has no real 'val' rows (needed to fine-tune and set thresholds)")
    if evaluated.empty:
        log.warning("manifest has no '%s' rows; reporting on the validation split", settings.eval_split)
        evaluated = val
    evaluate = card_transform(bundle.card)
    calibration_rows = balanced_calibration_rows(train, settings.calibration_per_class, settings.seed)
    norm_rows = batchnorm_rows(train, settings.batchnorm_images, settings.seed)
    counts = class_counts(train.label, class_names)
    return _Inputs(
        bundle=bundle, manifest=manifest, train=train, val=val, eval=evaluated, evaluate=evaluate,
        calibration_rows=calibration_rows, calibration=_image_batches(calibration_rows, class_names, evaluate, 32),
        batchnorm=_image_batches(norm_rows, class_names, evaluate, 64), counts=counts,
        minority=minority_classes_of(counts, class_names),
    )


def _fine_tuner(inputs: _Inputs, settings: PruningConfig, out_dir: Path) -> Callable[[nn.Module, int], nn.Module]:
    """The fine-tune after each stage: the bundle's training objective (its loss, class weighting and class
    sampler) on the training rows with the training augmentation, distilled from the unpruned net when `settings`
    ask.

    The sampler matters as much as the loss (see `stage_train_loaders`)."""
    from torch.utils.data import DataLoader

    from pipelines.data import ImageDataset
    from pipelines.training import build_loss
    from pipelines.transforms import train_transform

    card, class_names = inputs.bundle.card, inputs.bundle.class_names
    training = card.get("training", {})
    weighting = training.get("class_weighting", "effective")
    loss_fn = build_loss(training.get("loss") if training.get("loss") in ("ce", "focal") else "ce", inputs.counts,
                         weighting)
    norm = card["normalization"]
    augment = train_transform(inputs.bundle.input_size, norm["mean"], norm["std"], inputs.evaluate.color_constancy)
    train_ds = ImageDataset(inputs.train, class_names, augment)

    train_loader = stage_train_loaders(train_ds, len(class_names), training.get("sampler", "none"), settings)
    val_loader = DataLoader(ImageDataset(inputs.val, class_names, inputs.evaluate), batch_size=64)
    # the unpruned net teaches every stage's fine-tune
    distill = distillation_for(inputs.bundle.model, loss_fn, settings, inputs.counts, weighting)
    return stage_fine_tuner(train_loader, val_loader, loss_fn, fine_tune_settings(settings, weighting), out_dir
                            / "finetune", distill)


def _served_side(model: nn.Module, size: int, labels: np.ndarray, probs: np.ndarray, inputs: _Inputs,
                 threshold: float | None, settings: PruningConfig) -> dict[str, Any]:
    """One column of the report: the model's size and speed, and its accuracy on the evaluated rows."""
    bundle = inputs.bundle
    return {**measure_model(model, size, runs=settings.speed_runs),
            "accuracy": accuracy_report(labels, probs, bundle.class_names, bundle.malignant_classes, inputs.minority,
                                        threshold, settings.bootstrap)}


def _rescore(model: nn.Module, inputs: _Inputs, eval_ds: Any,
             settings: PruningConfig) -> tuple[Any, np.ndarray, np.ndarray]:
    """Re-fit the pruned net's calibration and referral threshold on validation with the bundle's test-time
    augmentation; returns (scores, labels, probabilities on the evaluated rows)."""
    from pipelines.calibration import calibration_method_of
    from pipelines.data import ImageDataset
    from pipelines.evaluation import add_score_intervals, calibrate_and_score
    from pipelines.transforms import card_tta

    bundle = inputs.bundle
    class_names, malignant = bundle.class_names, bundle.malignant_classes
    separate_test = settings.eval_split == "test" and inputs.eval is not inputs.val
    scores = calibrate_and_score(
        model, ImageDataset(inputs.val, class_names, inputs.evaluate),
        ImageDataset(inputs.eval, class_names, inputs.evaluate) if separate_test else None,
        class_names, malignant, card_tta(bundle.card), calibration_method_of(bundle.card), settings.target_sensitivity,
    )
    add_score_intervals(scores, class_names, malignant, settings.bootstrap)
    if scores.test_metrics is not None:
        return scores, scores.test_labels, scores.test_probs
    if inputs.eval is inputs.val or settings.eval_split == "val":
        return scores, scores.val_labels, scores.val_probs
    labels, probs = served_probs(model, eval_ds, scores.calibration, scores.tta)
    return scores, labels, probs


def _pruned_card(model: nn.Module, scores: Any, result: PruneResult, report: dict[str, Any], source: dict[str, Any],
                 inputs: _Inputs, manifest_path: str | Path, settings: PruningConfig) -> dict[str, Any]:
    """The pruned bundle's card: the source card with the channel plan, the re-fitted calibration and threshold,
    the pruned net's own metrics, the source's metrics apart, and a `pruning` block."""
    from models.pruned import extract_channel_plan
    from pipelines.manifest import manifest_sha256

    card = _json_copy(inputs.bundle.card)
    card["architecture"]["channel_plan"] = extract_channel_plan(model)
    threshold = scores.threshold
    card["operating_threshold"] = threshold["threshold"] if threshold else None
    card["threshold_metrics"] = threshold
    card["calibration"] = scores.calibration
    card["inference"] = {"tta": scores.tta}
    # The card's metrics are the pruned net's own; the source bundle's go apart, with its hash.
    card["metrics"] = scores.card_metrics()
    card["source_metrics"] = source
    card["manifest_sha256"] = manifest_sha256(manifest_path)  # fine-tuned on this manifest's training rows
    card["pruning"] = {k: report[k] for k in ("flops_reduction", "stages", "speedup_p50")} | {
        "method": settings.method, "base_flops": result.base_flops, "flops": result.flops}
    return card


def _paired_delta(before_labels: np.ndarray, before_probs: np.ndarray, after_labels: np.ndarray,
                  after_probs: np.ndarray, inputs: _Inputs, settings: PruningConfig) -> dict[str, Any] | None:
    """The paired-bootstrap change after - before, when both were scored on the same images of both kinds."""
    from pipelines.evaluation import paired_bootstrap_delta

    class_names, malignant = inputs.bundle.class_names, inputs.bundle.malignant_classes
    y_malignant = np.isin(np.asarray(class_names)[after_labels], malignant)
    if not (settings.bootstrap and np.array_equal(before_labels, after_labels)
            and 0 < y_malignant.sum() < len(y_malignant)):
        return None
    return paired_bootstrap_delta(after_labels, before_probs, after_probs, class_names, malignant, settings.bootstrap)


def prune_bundle(bundle_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
                 settings: PruningConfig) -> dict[str, Any]:
    """Prune a trained image bundle to a FLOPs target, fine-tune it, write the pruned bundle and a report."""
    from models.bundle import save_bundle
    from pipelines.data import ImageDataset
    from pipelines.evaluation import check_training_overlap, source_metrics
    from pipelines.transforms import card_tta

    torch.manual_seed(settings.seed)
    inputs = _read_inputs(bundle_dir, manifest_path, settings)
    bundle, manifest, out_dir = inputs.bundle, inputs.manifest, Path(out_dir)
    card, size = bundle.card, bundle.input_size
    eval_ds = ImageDataset(inputs.eval, bundle.class_names, inputs.evaluate, cache_images=True)
    scored = manifest[manifest.split.isin(["val", settings.eval_split]) & (manifest.source == "real")]
    overlap = check_training_overlap(bundle_dir, card, scored, "validation and evaluation", [manifest_path])

    # Before and after are scored as each bundle serves: its own test-time augmentation and calibration, so the
    # "before" column is what evaluating the source bundle gives and the "after" column what the card says.
    before_labels, before_probs = served_probs(bundle.model, eval_ds, card.get("calibration"), card_tta(card))
    before = _served_side(bundle.model, size, before_labels, before_probs, inputs, card.get("operating_threshold"),
                          settings)
    fine_tune = _fine_tuner(inputs, settings, out_dir)
    result = prune_to_flops(bundle.model, settings.method, settings.flops_reduction, size,
                            calibration=inputs.calibration, steps=settings.steps,
                            global_pruning=settings.global_pruning, max_layer_pruning=settings.max_layer_pruning,
                            fine_tune=fine_tune, seed=settings.seed, batchnorm_batches=inputs.batchnorm,
                            round_to=settings.round_to, layer_ratios=settings.layer_ratios)
    model = result.model.cpu().eval()
    # The pruned net is a new model: its calibration and referral threshold are re-fitted, its card shows its own.
    scores, after_labels, after_probs = _rescore(model, inputs, eval_ds, settings)
    threshold = scores.threshold["threshold"] if scores.threshold else None
    after = _served_side(model, size, after_labels, after_probs, inputs, threshold, settings)
    source = source_metrics(bundle_dir, card)
    report = {
        "settings": settings.model_dump(), "source_bundle": str(bundle_dir),
        "source_bundle_sha256": source["bundle_sha256"], "manifest": str(manifest_path),
        "calibration_counts": inputs.calibration_rows.label.value_counts().sort_index().to_dict(),
        "minority_classes": inputs.minority, "eval_split": settings.eval_split, "stages": result.stages,
        "before": before, "after": after,
        "delta": _paired_delta(before_labels, before_probs, after_labels, after_probs, inputs, settings),
        "training_overlap": overlap, "flops_reduction": result.flops_reduction,
        "speedup_p50": before["latency_ms_p50"] / after["latency_ms_p50"],
    }
    new_card = _pruned_card(model, scores, result, report, source, inputs, manifest_path, settings)
    save_bundle(out_dir, model, new_card)
    write_pruning_report(report, out_dir)
    return report


def fine_tune_control(bundle_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
                      settings: PruningConfig, stages: int = 1) -> dict[str, Any]:
    """The control of a pruning run: the same fine-tune (`settings`' epochs, learning rate, EMA, distillation,
    the bundle's loss and sampler, BatchNorm re-estimated after it) applied `stages` times to the unpruned net.

    What it does to the net's validation scores is what the fine-tune alone costs or gains, apart from any filter
    removed. Returns the validation balanced accuracy and malignant AUC (one view, softmax) before and after each
    stage."""
    from pipelines.data import ImageDataset
    from pipelines.evaluation import compute_metrics
    from pipelines.pruning.search import recalibrate_batchnorm

    if stages < 1:
        raise ValueError(f"control stages {stages}: expected >= 1")
    torch.manual_seed(settings.seed)
    inputs = _read_inputs(bundle_dir, manifest_path, settings)
    bundle = inputs.bundle
    val_ds = ImageDataset(inputs.val, bundle.class_names, inputs.evaluate, cache_images=True)

    def scores(model: nn.Module) -> dict[str, float]:
        labels, probs = served_probs(model, val_ds, None, 1)
        metrics = compute_metrics(labels, probs, bundle.class_names, bundle.malignant_classes)
        return {"balanced_accuracy": float(metrics["balanced_accuracy"]),
                "malignant_auc": float(metrics["malignant_auc"])}

    fine_tune = _fine_tuner(inputs, settings, Path(out_dir))
    model = copy.deepcopy(bundle.model)
    rows = [{"stage": 0, **scores(model)}]
    for stage in range(1, stages + 1):
        model = fine_tune(model, stage)
        recalibrate_batchnorm(model, inputs.batchnorm, str(next(model.parameters()).device))
        rows.append({"stage": stage, **scores(model)})
        log.info("control stage %d: %s", stage, rows[-1])
    return {"settings": settings.model_dump(), "split": "val", "images": len(val_ds), "views": 1, "stages": rows}


def run_pruning_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> StageOutputs:
    """`lesionlab run` stage: prune run_dir/bundle into run_dir/bundle_pruned."""
    settings = load_pruning_config(config.pruning)
    run_dir = Path(run_dir)
    bundle = run_dir / "bundle"
    if not (bundle / "card.json").is_file():
        raise FileNotFoundError(f"pruning needs the trained bundle '{bundle}'; the train stage did not write one")
    out = run_dir / "bundle_pruned"
    prune_bundle(bundle, Path(manifest_path or run_dir / "manifest.csv"), out, settings)
    return StageOutputs(bundle=out, report=out / "pruning_report.md")
