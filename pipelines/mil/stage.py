"""The MIL stage of `lesionlab run` and `lesionlab mil-train`: tile the slides, train SC-MIL or ABMIL with the
project's trainer, keep the right epoch, calibrate, choose the referral threshold, score, write bundle and report.

`run_mil_stage` runs one named step after another: slides and their grouped split (`prepare_slides`), the bag
manifest and the bag datasets (cached encoder features or patches), the SC-MIL net and its loss, training with
`pipelines.training.fit` (a `loss_forward` that mixes SupCon and CE by the epoch's beta_t), the choice of the shipped
epoch, calibration + threshold + per-split metrics (`score_bags`), and the bundle and report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.bags import build_bag_manifest, ingest_slide_table, load_bag, write_bag_manifest
from pipelines.calibration import calibrated_probs, fit_calibration
from pipelines.config import MILConfig, TrainSettings
from pipelines.manifest import class_names_of, grouped_split, manifest_sha256, read_manifest, write_manifest
from pipelines.mil.datasets import (
    FeatureBagDataset,
    PatchBagDataset,
    collate_bags,
    dataset_bag_logits,
    predict_dataset_bags,
)
from pipelines.mil.features import cached_bag_features
from pipelines.stage import StageOutputs

if TYPE_CHECKING:
    from models.scmil import SCMILLoss
    from pipelines.training import FitResult

__all__ = [
    "MIN_CALIBRATION_CASES",
    "BagScores",
    "SlideSplit",
    "bag_forward",
    "fit_bag_calibration",
    "load_mil_config",
    "make_loss_forward",
    "prepare_slides",
    "run_mil_stage",
    "score_bags",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Temperature scaling needs enough validation cases that a perfectly separated handful does not drive the
# temperature towards 0 (an over-confident model "calibrated" on 6 slides).
MIN_CALIBRATION_CASES = 30


def load_mil_config(section: dict[str, Any] | MILConfig | None) -> MILConfig:
    """Validate a run config's `mil:` section (a bad value is a one-line ConfigError naming `mil.field`)."""
    from pipelines.config import stage_settings

    return stage_settings({"mil": section}, "mil", MILConfig)


def run_mil_stage(config, run_dir: str | Path, manifest_path: str | Path | None = None) -> StageOutputs:
    """Tile the slides, train SC-MIL/ABMIL with the project's trainer, evaluate, and write the MIL bundle."""
    from models.registry import build_model, default_normalization
    from models.scmil import SCMILLoss
    from pipelines.training import make_accelerator

    run_dir = Path(run_dir)
    mil = load_mil_config(config.mil)
    settings = _training_settings(config.training, mil)
    mil_dir = run_dir / "mil"
    slides = prepare_slides(config, mil, mil_dir, Path(manifest_path) if manifest_path else None)
    bags_path = mil_dir / "bags.csv"
    write_bag_manifest(build_bag_manifest(slides.table, mil.tiling), bags_path)

    normalization = default_normalization(mil.encoder)
    architecture = _architecture_kwargs(mil)
    accelerator = make_accelerator(settings)  # seeds every generator: the net below starts from `settings.seed`
    model = build_model("scmil", len(slides.class_names), mil.input_size, pretrained=mil.pretrained, **architecture)
    datasets = _bag_datasets(mil, slides, model.encoder, normalization, mil_dir / "cache", settings.seed)
    loss = SCMILLoss(settings.epochs, mil.method, mil.schedule, mil.temperature)

    result = _train_bags(model, datasets, loss, mil, settings, run_dir, accelerator, slides)
    model = result.model.cpu().eval()
    if not accelerator.is_main_process:
        return StageOutputs(bundle=run_dir / "bundle")
    selected_epoch = _select_epoch(model, result, loss, mil, run_dir)
    malignant = [c for c in mil.malignant_classes if c in slides.class_names]
    scores = score_bags(model, datasets, slides, malignant, settings)
    card = _mil_card(mil, settings, slides, architecture, normalization, scores, result, selected_epoch)
    return _write_outputs(model, card, scores, result, mil, run_dir, {"slides": slides.path, "bags": bags_path})


# Slides and their split


@dataclass
class SlideSplit:
    """The slide table of a MIL run (written to `path`), its class names and its rows per split."""

    table: pd.DataFrame
    path: Path
    class_names: list[str]
    by_split: dict[str, pd.DataFrame]

    @property
    def class_index(self) -> dict[str, int]:
        """Label -> class index."""
        return {c: i for i, c in enumerate(self.class_names)}

    def labels(self, split: str) -> pd.Series:
        """Class indices of one split's slides."""
        return self.by_split[split].label.map(self.class_index)

    def train_counts(self) -> dict[str, int]:
        """Training slides per class."""
        from pipelines.training import class_counts

        return dict(zip(self.class_names, class_counts(self.by_split["train"].label, self.class_names)))


def _read_slides(config, mil: MILConfig, manifest_path: Path | None) -> pd.DataFrame:
    """The slide table from `mil.data` (or the run's manifest), split by group when it has no split yet."""
    if mil.data is not None:
        d = mil.data
        slides = ingest_slide_table(d.root, d.labels, d.images, d.image_column, d.label_column, d.group_column)
    elif manifest_path is not None:
        slides = read_manifest(manifest_path)
    else:
        raise ValueError("the mil section has no `data` and the run has no manifest; set mil.data.root")
    if (slides.split == "").any():
        split = config.split
        slides = grouped_split(slides, split.val_fraction, split.test_fraction, split.seed)
    return slides


def prepare_slides(config, mil: MILConfig, mil_dir: Path, manifest_path: Path | None) -> SlideSplit:
    """Read and split the slides, write them to `mil_dir/slides.csv`, and check every split can train."""
    slides = _read_slides(config, mil, manifest_path)
    slides_path = write_manifest(slides, mil_dir / "slides.csv")
    class_names = class_names_of(slides)
    if len(class_names) < 2:
        raise ValueError(f"MIL training needs two or more classes; slides have only {class_names}")
    by_split = {s: slides[slides.split == s].reset_index(drop=True) for s in SPLITS}
    if by_split["train"].empty or by_split["val"].empty:
        raise ValueError("the slide split has no train or no val slides; lower split.val_fraction or add slides")
    split = SlideSplit(slides, slides_path, class_names, by_split)
    counts = split.train_counts()
    if min(counts.values()) == 0:
        raise ValueError(f"every class needs training slides; train counts are {counts}")
    return split


# Bag datasets, model and training


def _training_settings(training: TrainSettings, mil: MILConfig) -> TrainSettings:
    """The trainer settings of a MIL run: no EMA, no channels-last, and for SC-MIL no early stop."""
    # Bags are few (tens of slides): an EMA over so few steps would stay near the initialisation, and the
    # supervised-contrastive β schedule already decides which epoch is shipped.
    settings = training.model_copy(update={"ema_decay": 0.0, "channels_last": False})
    if mil.method == "scmil" and settings.patience < settings.epochs:
        # The classifier only learns once beta_t falls: stopping while SupCon dominates would keep an untrained head.
        log.info("SC-MIL runs its whole beta schedule: early stopping (patience %d) is off", settings.patience)
        settings = settings.model_copy(update={"patience": settings.epochs})
    return settings


def _architecture_kwargs(mil: MILConfig) -> dict[str, Any]:
    """The SC-MIL net's keyword arguments, as `build_model` takes them and the card records them."""
    return {
        "encoder": mil.encoder,
        "freeze_encoder": mil.freeze_encoder,
        "embed_dim": mil.embed_dim,
        "attention_dim": mil.attention_dim,
        "projection_dim": mil.projection_dim,
        "dropout": mil.dropout,
    }


def _bag_datasets(
    mil: MILConfig, slides: SlideSplit, encoder: nn.Module, normalization: dict[str, Any], cache_dir: Path, seed: int
) -> dict[str, Dataset]:
    """One dataset per split: features cached under `mil.cache_dir` (default `cache_dir`) when the encoder is frozen
    and caching is on, else patch bags (training bags subsampled to `mil.max_train_instances` and augmented)."""
    mean, std = normalization["mean"], normalization["std"]
    if mil.freeze_encoder and mil.cache_embeddings:
        cache = Path(mil.cache_dir) if mil.cache_dir else cache_dir
        encoder_id = f"{mil.encoder}|pretrained={mil.pretrained}|{mil.input_size}|{json.dumps(normalization)}"
        features = cached_bag_features(slides.table, mil.tiling, encoder, encoder_id, mil.input_size, mean, std, cache)
        return {split: FeatureBagDataset([features[s]["features"] for s in df.image_id], slides.labels(split))
                for split, df in slides.by_split.items()}
    datasets: dict[str, Dataset] = {}
    for split, df in slides.by_split.items():
        bags = [load_bag(p, mil.tiling, i) for p, i in zip(df.path, df.image_id)]
        datasets[split] = PatchBagDataset(
            bags, slides.labels(split), mil.input_size, mean, std,
            mil.max_train_instances if split == "train" else None, augment=split == "train", seed=seed,
        )
    return datasets


def bag_forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """The trainer's `forward`: (x, mask, labels) -> (logits, labels)."""
    x, mask, labels = batch
    return model(x, mask), labels


def make_loss_forward(loss):
    """The trainer's `loss_forward`: beta_t * SupCon + (1 - beta_t) * CE on one batch of bags."""

    def loss_forward(model: nn.Module, batch, epoch: int) -> torch.Tensor:
        x, mask, labels = batch
        value, _ = loss(model(x, mask, return_all=True), labels, epoch)
        return value

    return loss_forward


def _train_bags(
    model: nn.Module,
    datasets: dict[str, Dataset],
    loss: SCMILLoss,
    mil: MILConfig,
    settings: TrainSettings,
    run_dir: Path,
    accelerator: Any,
    slides: SlideSplit,
) -> FitResult:
    """Train on the training bags with `pipelines.training.fit`, validating on the validation bags every epoch."""
    from models.scmil import beta_schedule
    from pipelines.training import fit

    def on_epoch_start(epoch: int, total: int) -> None:
        beta = 0.0 if mil.method == "abmil" else beta_schedule(epoch, total, mil.schedule)
        log.info("epoch %d/%d: beta_t = %.3f (SupCon weight)", epoch + 1, total, beta)

    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(
        datasets["train"], batch_size=settings.batch_size, shuffle=True, collate_fn=collate_bags, generator=generator
    )
    val_loader = DataLoader(datasets["val"], batch_size=settings.batch_size, collate_fn=collate_bags)
    log.info("%s on %d training slides %s", mil.method, len(datasets["train"]), slides.train_counts())
    return fit(
        model,
        train_loader,
        val_loader,
        None,
        settings,
        run_dir,
        accelerator,
        forward=bag_forward,
        on_epoch_start=on_epoch_start,
        loss_forward=make_loss_forward(loss),
    )


def _select_epoch(model: nn.Module, result: FitResult, loss: SCMILLoss, mil: MILConfig, run_dir: Path) -> int:
    """The epoch `model` ships: the best validation epoch, or for SC-MIL the last one when the best came while
    beta_t was above `mil.select_below_beta` (its weights are then loaded into `model`)."""
    if mil.method != "scmil" or loss.beta(max(0, result.best_epoch - 1)) <= mil.select_below_beta:
        return result.best_epoch
    # An early "best" epoch has a barely trained classifier (probabilities near 0.5): keep the last epoch.
    from safetensors.torch import load_file

    model.load_state_dict(load_file(run_dir / "checkpoints" / "last" / "model.safetensors", device="cpu"))
    selected_epoch = len(result.history)
    log.info("best validation epoch %d had beta_t > %.2f; the last epoch (%d) is kept",
             result.best_epoch, mil.select_below_beta, selected_epoch)
    return selected_epoch


# Calibration, threshold and metrics


def fit_bag_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "temperature") -> dict[str, Any]:
    """The calibration block of a MIL bundle: fitted on validation bags when there are enough of them."""
    if len(labels) < MIN_CALIBRATION_CASES or len(np.unique(labels)) < 2:
        return {"method": "none", "temperature": 1.0, "fitted_on": "nothing",
                "reason": f"{len(labels)} validation slides; temperature scaling needs at least "
                          f"{MIN_CALIBRATION_CASES} covering every class"}
    return fit_calibration(logits, labels, method, fitted_on=f"validation split ({len(labels)} slides)")


@dataclass
class BagScores:
    """A MIL model's calibration and referral threshold (both from the validation slides) and each scored split's
    metrics ("validation", and "test" when the run has test slides) with their 95 % bootstrap intervals."""

    calibration: dict[str, Any]
    threshold: dict[str, float] | None
    split_metrics: dict[str, dict[str, Any]]
    malignant_classes: list[str]

    @property
    def operating_threshold(self) -> float | None:
        """The referral threshold on P(malignant), or None when none could be chosen."""
        return self.threshold["threshold"] if self.threshold else None

    @property
    def eval_split(self) -> str:
        """The split the report describes: "test" when there were test slides, else "val"."""
        return "test" if "test" in self.split_metrics else "val"

    @property
    def headline(self) -> dict[str, Any]:
        """The metrics of `eval_split`."""
        return self.split_metrics["test" if self.eval_split == "test" else "validation"]


def score_bags(
    model: nn.Module,
    datasets: dict[str, Dataset],
    slides: SlideSplit,
    malignant: list[str],
    settings: TrainSettings,
) -> BagScores:
    """Calibrate on the validation bags, choose the referral threshold on their calibrated probabilities
    (`pipelines.evaluation.referral_threshold`), and score validation and test bags at that threshold."""
    from pipelines.evaluation import bootstrap_intervals, compute_metrics, referral_threshold

    class_names = slides.class_names
    val_labels = slides.labels("val").to_numpy()
    val_logits = dataset_bag_logits(model, datasets["val"])
    calibration = fit_bag_calibration(val_logits, val_labels, settings.calibration)
    val_probs = calibrated_probs(val_logits, calibration)
    threshold = referral_threshold(val_labels, val_probs, class_names, malignant, settings.target_sensitivity)
    op = threshold["threshold"] if threshold else None
    scored = {"validation": (val_labels, val_probs)}
    if len(datasets["test"]):
        scored["test"] = (slides.labels("test").to_numpy(),
                          predict_dataset_bags(model, datasets["test"], calibration=calibration))
    # Each split keeps its own metrics with 95 % bootstrap intervals, in the same shape as an image card's.
    split_metrics = {}
    for name, (labels, probs) in scored.items():
        split_metrics[name] = compute_metrics(labels, probs, class_names, malignant, op)
        intervals = bootstrap_intervals(labels, probs, class_names, malignant, op)
        if intervals is not None:
            split_metrics[name]["intervals"] = intervals
    return BagScores(calibration, threshold, split_metrics, malignant)


# Bundle and report


def _mil_card(
    mil: MILConfig,
    settings: TrainSettings,
    slides: SlideSplit,
    architecture: dict[str, Any],
    normalization: dict[str, Any],
    scores: BagScores,
    result: FitResult,
    selected_epoch: int,
) -> dict[str, Any]:
    """The MIL bundle's card: net, classes, tiling, calibration, threshold, per-split metrics, training record."""
    from pipelines.evaluation import card_metrics

    return {
        "task": "mil",
        "architecture": {"name": "scmil", "kwargs": architecture},
        "class_names": slides.class_names,
        "malignant_classes": scores.malignant_classes,
        "input_size": mil.input_size,
        "normalization": normalization,
        "tiling": mil.tiling.model_dump(mode="json"),
        "mil": {"method": mil.method, "schedule": mil.schedule, "temperature": mil.temperature},
        "calibration": scores.calibration,
        "operating_threshold": scores.operating_threshold,
        "threshold_metrics": scores.threshold,
        "metrics": {name: card_metrics(m) for name, m in scores.split_metrics.items()},
        "manifest_sha256": manifest_sha256(slides.path),
        "training": {
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "selected_epoch": selected_epoch,
            "best_val_balanced_accuracy": result.best_score,
            "train_counts": slides.train_counts(),
            "seed": settings.seed,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
        },
    }


def _write_outputs(
    model: nn.Module,
    card: dict[str, Any],
    scores: BagScores,
    result: FitResult,
    mil: MILConfig,
    run_dir: Path,
    files: dict[str, Path],
) -> StageOutputs:
    """Save the bundle and the report (metrics of `scores.eval_split`, training history) under `run_dir`."""
    from models.bundle import save_bundle
    from pipelines.evaluation import write_report

    bundle = save_bundle(run_dir / "bundle", model, card)
    report = write_report(
        scores.headline, run_dir / "report", f"{mil.method.upper()} on {scores.eval_split} slides",
        {"history": result.history},
    )
    return StageOutputs(bundle=bundle, report=report, files=files)
