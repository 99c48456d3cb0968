"""SC-MIL / ABMIL: train bag classifiers on tiled H&E slides, evaluate them, predict one row per slide.

The run config's `mil:` section (validated by `MILConfig`) says where the slides are, how they are tiled and which
method trains; `training:` holds the usual trainer settings. Training goes through the project's trainer
(`pipelines.training.fit`) with a `loss_forward` that mixes SupCon and CE by the epoch's beta_t.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.bags import Bag, TilingSettings, load_bag, patches_to_tensor
from pipelines.calibration import calibrated_probs, fit_calibration

log = logging.getLogger(__name__)


class MILDataConfig(BaseModel):
    """Slides listed in a labels CSV next to an image folder (UCSB breast layout)."""

    model_config = ConfigDict(extra="forbid")

    root: str = "data/ucsb_breast_sample"
    labels: str = "labels.csv"
    images: str = "images"
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = "tma_batch"


class MILConfig(BaseModel):
    """The `mil:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    data: MILDataConfig | None = Field(None, description="slides from a labels CSV; None: the run's manifest")
    malignant_classes: list[str] = ["malignant"]
    tiling: TilingSettings = TilingSettings(patch_size=128, min_tissue=0.25)
    method: Literal["scmil", "abmil"] = "scmil"
    schedule: Literal["parabolic", "linear", "step"] = "parabolic"
    temperature: float = Field(0.1, gt=0)
    encoder: str = "efficientnet-lite0"
    pretrained: bool = True
    freeze_encoder: bool = True
    input_size: int = Field(128, ge=16, description="patches are resized to this for the instance encoder")
    embed_dim: int = 128
    attention_dim: int = 64
    projection_dim: int = 64
    dropout: float = 0.25
    cache_embeddings: bool = Field(True, description="embed patches once with the frozen encoder and train on features")
    cache_dir: str | None = None
    max_train_instances: int | None = Field(64, ge=1, description="instances sampled per bag per step (patch bags)")
    select_below_beta: float = Field(
        0.5, ge=0, le=1, description="SC-MIL keeps its best validation epoch only if beta_t was at most this there"
    )


def load_mil_config(section: dict[str, Any] | MILConfig | None) -> MILConfig:
    """Validate a run config's `mil:` section (a bad value is a one-line ConfigError naming `mil.field`)."""
    from pipelines.config import stage_settings

    return stage_settings({"mil": section}, "mil", MILConfig)


# Datasets over bags


class FeatureBagDataset(Dataset):
    """Bags of cached instance features: item = ((N, D) features, label index)."""

    def __init__(self, features: Sequence[torch.Tensor], labels: Sequence[int]) -> None:
        self.features = list(features)
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.labels[index]


class PatchBagDataset(Dataset):
    """Bags of patches for a trainable encoder: item = ((N, 3, s, s) patches, label index).

    For training, at most `max_instances` patches are drawn per bag and flipped/rotated by 90 degrees at random.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        labels: Sequence[int],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        max_instances: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.bags, self.labels = list(bags), [int(y) for y in labels]
        self.input_size, self.mean, self.std = input_size, list(mean), list(std)
        self.max_instances, self.augment = max_instances, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patches = self.bags[index].patches
        if self.max_instances is not None and len(patches) > self.max_instances:
            patches = patches[np.sort(self.rng.choice(len(patches), self.max_instances, replace=False))]
        if self.augment:
            patches = np.rot90(patches, k=int(self.rng.integers(4)), axes=(1, 2))
            if self.rng.random() < 0.5:
                patches = patches[:, :, ::-1]
        return patches_to_tensor(patches, self.input_size, self.mean, self.std), self.labels[index]


def collate_bags(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to the longest one: (x (B, N, ...), mask (B, N) True for real instances, labels (B,))."""
    n_max = max(x.shape[0] for x, _ in items)
    x = torch.zeros((len(items), n_max, *items[0][0].shape[1:]), dtype=items[0][0].dtype)
    mask = torch.zeros((len(items), n_max), dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return x, mask, torch.tensor([y for _, y in items], dtype=torch.long)


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


def train_in_memory(
    model: nn.Module,
    dataset: Dataset,
    loss,
    epochs: int,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
) -> nn.Module:
    """A fixed-epoch loop without checkpoints (cross-validation in the benchmark); same model and loss as `fit`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_bags, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        for x, mask, labels in loader:
            value, _ = loss(model(x, mask, return_all=True), labels, epoch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_dataset_bags(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, calibration: dict[str, Any] | None = None
) -> np.ndarray:
    """(B, C) (calibrated) class probabilities for every bag of a dataset."""
    return calibrated_probs(dataset_bag_logits(model, dataset, batch_size), calibration)


@torch.no_grad()
def dataset_bag_logits(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> np.ndarray:
    """(B, C) logits for every bag of a dataset."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_bags)
    logits = [model(x, mask).float() for x, mask, _ in loader]
    return torch.cat(logits).numpy() if logits else np.zeros((0, 0))


# Temperature scaling needs enough validation cases that a perfectly separated handful does not drive the
# temperature towards 0 (an over-confident model "calibrated" on 6 slides).
MIN_CALIBRATION_CASES = 30


def fit_bag_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "temperature") -> dict[str, Any]:
    """The calibration block of a MIL bundle: fitted on validation bags when there are enough of them."""
    if len(labels) < MIN_CALIBRATION_CASES or len(np.unique(labels)) < 2:
        return {"method": "none", "temperature": 1.0, "fitted_on": "nothing",
                "reason": f"{len(labels)} validation slides; temperature scaling needs at least "
                          f"{MIN_CALIBRATION_CASES} covering every class"}
    return fit_calibration(logits, labels, method, fitted_on=f"validation split ({len(labels)} slides)")


# The run stage


def _slides_for(config, mil: MILConfig, manifest_path: Path | None) -> pd.DataFrame:
    from pipelines.bags import ingest_slide_table
    from pipelines.manifest import grouped_split, read_manifest

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


def run_mil_stage(config, run_dir: str | Path, manifest_path: str | Path | None = None) -> dict[str, Any]:
    """Tile the slides, train SC-MIL/ABMIL with the project's trainer, evaluate, and write the MIL bundle."""
    from models.bundle import save_bundle
    from models.registry import build_model, default_normalization
    from models.scmil import SCMILLoss, beta_schedule
    from pipelines.bags import build_bag_manifest, cached_bag_features, write_bag_manifest
    from pipelines.evaluation import (
        bootstrap_intervals,
        card_metrics,
        compute_metrics,
        referral_threshold,
        write_report,
    )
    from pipelines.manifest import class_names_of, manifest_sha256, write_manifest
    from pipelines.training import class_counts, fit, make_accelerator

    run_dir = Path(run_dir)
    mil = load_mil_config(config.mil)
    # Bags are few (tens of slides): an EMA over so few steps would stay near the initialisation, and the
    # supervised-contrastive β schedule already decides which epoch is shipped.
    settings = config.training.model_copy(update={"ema_decay": 0.0, "channels_last": False})
    mil_dir = run_dir / "mil"
    slides = _slides_for(config, mil, Path(manifest_path) if manifest_path else None)
    slides_path = write_manifest(slides, mil_dir / "slides.csv")
    class_names = class_names_of(slides)
    if len(class_names) < 2:
        raise ValueError(f"MIL training needs two or more classes; slides have only {class_names}")
    index = {c: i for i, c in enumerate(class_names)}
    by_split = {s: slides[slides.split == s].reset_index(drop=True) for s in ("train", "val", "test")}
    if by_split["train"].empty or by_split["val"].empty:
        raise ValueError("the slide split has no train or no val slides; lower split.val_fraction or add slides")
    counts = class_counts(by_split["train"].label, class_names)
    if min(counts) == 0:
        raise ValueError(f"every class needs training slides; train counts are {dict(zip(class_names, counts))}")

    tiling = mil.tiling
    write_bag_manifest(build_bag_manifest(slides, tiling), mil_dir / "bags.csv")
    norm = default_normalization(mil.encoder)
    kwargs = {
        "encoder": mil.encoder,
        "freeze_encoder": mil.freeze_encoder,
        "embed_dim": mil.embed_dim,
        "attention_dim": mil.attention_dim,
        "projection_dim": mil.projection_dim,
        "dropout": mil.dropout,
    }
    accelerator = make_accelerator(settings)
    model = build_model("scmil", len(class_names), mil.input_size, pretrained=mil.pretrained, **kwargs)

    datasets: dict[str, Dataset] = {}
    if mil.freeze_encoder and mil.cache_embeddings:
        cache = Path(mil.cache_dir) if mil.cache_dir else mil_dir / "cache"
        encoder_id = f"{mil.encoder}|pretrained={mil.pretrained}|{mil.input_size}|{json.dumps(norm)}"
        features = cached_bag_features(
            slides, tiling, model.encoder, encoder_id, mil.input_size, norm["mean"], norm["std"], cache
        )
        for split, df in by_split.items():
            datasets[split] = FeatureBagDataset([features[s]["features"] for s in df.image_id], df.label.map(index))
    else:
        for split, df in by_split.items():
            bags = [load_bag(p, tiling, i) for p, i in zip(df.path, df.image_id)]
            datasets[split] = PatchBagDataset(
                bags, df.label.map(index), mil.input_size, norm["mean"], norm["std"],
                mil.max_train_instances if split == "train" else None, augment=split == "train", seed=settings.seed,
            )

    loss = SCMILLoss(settings.epochs, mil.method, mil.schedule, mil.temperature)

    def on_epoch_start(epoch: int, total: int) -> None:
        beta = 0.0 if mil.method == "abmil" else beta_schedule(epoch, total, mil.schedule)
        log.info("epoch %d/%d: beta_t = %.3f (SupCon weight)", epoch + 1, total, beta)

    if mil.method == "scmil" and settings.patience < settings.epochs:
        # The classifier only learns once beta_t falls: stopping while SupCon dominates would keep an untrained head.
        log.info("SC-MIL runs its whole beta schedule: early stopping (patience %d) is off", settings.patience)
        settings = settings.model_copy(update={"patience": settings.epochs})
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(
        datasets["train"], batch_size=settings.batch_size, shuffle=True, collate_fn=collate_bags, generator=generator
    )
    val_loader = DataLoader(datasets["val"], batch_size=settings.batch_size, collate_fn=collate_bags)
    log.info("%s on %d training slides %s", mil.method, len(datasets["train"]), dict(zip(class_names, counts)))
    result = fit(
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
    model = result.model.cpu().eval()
    if not accelerator.is_main_process:
        return {"bundle": str(run_dir / "bundle")}
    selected_epoch = result.best_epoch
    if mil.method == "scmil" and loss.beta(max(0, result.best_epoch - 1)) > mil.select_below_beta:
        # An early "best" epoch has a barely trained classifier (probabilities near 0.5): keep the last epoch.
        from safetensors.torch import load_file

        model.load_state_dict(load_file(run_dir / "checkpoints" / "last" / "model.safetensors", device="cpu"))
        selected_epoch = len(result.history)
        log.info("best validation epoch %d had beta_t > %.2f; the last epoch (%d) is kept",
                 result.best_epoch, mil.select_below_beta, selected_epoch)

    malignant = [c for c in mil.malignant_classes if c in class_names]
    val_labels = by_split["val"].label.map(index).to_numpy()
    val_logits = dataset_bag_logits(model, datasets["val"])
    calibration = fit_bag_calibration(val_logits, val_labels, settings.calibration)
    val_probs = calibrated_probs(val_logits, calibration)
    threshold = referral_threshold(val_labels, val_probs, class_names, malignant, settings.target_sensitivity)
    op = threshold["threshold"] if threshold else None
    eval_split = "test" if len(datasets["test"]) else "val"
    scored = {"validation": (val_labels, val_probs)}
    if eval_split == "test":
        scored["test"] = (by_split["test"].label.map(index).to_numpy(),
                          predict_dataset_bags(model, datasets["test"], calibration=calibration))
    # The card keeps each split's own metrics with 95 % bootstrap intervals, in the same shape as an image card's.
    split_metrics = {}
    for name, (labels, probs) in scored.items():
        split_metrics[name] = compute_metrics(labels, probs, class_names, malignant, op)
        intervals = bootstrap_intervals(labels, probs, class_names, malignant, op)
        if intervals is not None:
            split_metrics[name]["intervals"] = intervals
    metrics = split_metrics["test" if eval_split == "test" else "validation"]
    card = {
        "task": "mil",
        "architecture": {"name": "scmil", "kwargs": kwargs},
        "class_names": class_names,
        "malignant_classes": malignant,
        "input_size": mil.input_size,
        "normalization": norm,
        "tiling": tiling.model_dump(mode="json"),
        "mil": {"method": mil.method, "schedule": mil.schedule, "temperature": mil.temperature},
        "calibration": calibration,
        "operating_threshold": op,
        "threshold_metrics": threshold,
        "metrics": {name: card_metrics(m) for name, m in split_metrics.items()},
        "manifest_sha256": manifest_sha256(slides_path),
        "training": {
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "selected_epoch": selected_epoch,
            "best_val_balanced_accuracy": result.best_score,
            "train_counts": dict(zip(class_names, counts)),
            "seed": settings.seed,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
        },
    }
    bundle = save_bundle(run_dir / "bundle", model, card)
    report = write_report(
        metrics, run_dir / "report", f"{mil.method.upper()} on {eval_split} slides", {"history": result.history}
    )
    return {"bundle": str(bundle), "report": str(report), "slides": str(slides_path), "bags": str(mil_dir / "bags.csv")}


# Prediction


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
    from pipelines.bags import embed_patches

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
    from pipelines.bags import SLIDE_SUFFIXES
    from pipelines.images import IMAGE_SUFFIXES

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


# CLI


def _cmd_mil_train(args: argparse.Namespace) -> None:
    from pipelines.cli import load_run_config
    from pipelines.run import run_stage

    config, run_dir = load_run_config(args)
    if config.mil is None:
        raise ValueError(f"config '{args.config}' has no `mil:` section")
    # As the `run` mil stage: records the config attempt and the marker, discards checkpoints of other settings.
    outputs = run_stage("mil", config, run_dir, None, force="lesionlab mil-train always trains").outputs
    print(f"bundle: {outputs['bundle']}\nreport: {outputs.get('report')}")


def _cmd_tile(args: argparse.Namespace) -> None:
    from pipelines.bags import build_bag_manifest, ingest_slide_table, write_bag_manifest

    settings = TilingSettings(
        patch_size=args.patch_size, stride=args.stride, level=args.level, min_tissue=args.min_tissue,
        max_patches=args.max_patches,
    )
    if args.labels:
        slides = ingest_slide_table(args.root, args.labels, args.images, args.image_column, args.label_column,
                                    args.group_column)
    else:
        paths = list_slides(args.root)
        slides = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p.resolve()) for p in paths],
                               "label": "", "group": [p.stem for p in paths], "split": "", "source": "real"})
    bags = build_bag_manifest(slides, settings)
    write_bag_manifest(bags, args.out)
    per_slide = bags.groupby("slide_id").size()
    print(f"{len(bags)} patches from {len(per_slide)} slides ({per_slide.min()}-{per_slide.max()} each) -> {args.out}")


def add_cli(subparsers) -> None:
    """Register `lesionlab mil-train` and `lesionlab tile`."""
    from pipelines.cli import add_config_arguments

    p = subparsers.add_parser("mil-train", help="train an SC-MIL / ABMIL bag classifier from a config with `mil:`")
    add_config_arguments(p, "mil.method=abmil training.epochs=5")
    p.set_defaults(func=_cmd_mil_train)

    p = subparsers.add_parser("tile", help="tile H&E images / slides into tissue patches; write a bag manifest CSV")
    p.add_argument("--root", required=True, help="dataset folder (with --labels) or a folder of slides")
    p.add_argument("--labels", help="labels CSV inside ROOT (e.g. labels.csv); omit to tile every slide in ROOT")
    p.add_argument("--images", default="images", help="image folder inside ROOT (with --labels)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", default=None)
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--min-tissue", type=float, default=0.25)
    p.add_argument("--max-patches", type=int, default=None)
    p.add_argument("--out", required=True, help="bag manifest CSV to write")
    p.set_defaults(func=_cmd_tile)
