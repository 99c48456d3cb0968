"""The project's trainer (Hugging Face Accelerate) and image-classifier training from a run config."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.registry import architecture_kwargs
from pipelines.config import RunConfig, TrainSettings
from pipelines.ood import OODDetector

log = logging.getLogger(__name__)

Batch = Any
EMA_FILE = "ema.safetensors"
BEST_RAW_FILE = "best_raw.safetensors"
ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """What `fit` returns: the best model (unwrapped, on its device) and the per-epoch history."""

    model: nn.Module
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_images_per_s: float = float("nan")
    planned_epochs: int = 0
    train_minutes: float = float("nan")
    raw_weights: Path | None = None  # the last epoch's raw (non-EMA) weights, when an EMA was shipped instead


def default_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) batch -> (logits, labels)."""
    images, labels = batch
    return model(images), labels


def class_counts(labels: list[str] | pd.Series, class_names: list[str]) -> list[int]:
    """Number of samples of each class, in `class_names` order."""
    series = pd.Series(list(labels))
    return [int((series == name).sum()) for name in class_names]


def warmup_cosine(total_steps: int | Callable[[], int], warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total_steps` (a number, or a callable read at
    every step, so a schedule can be re-planned to fit a time budget)."""
    total = total_steps if callable(total_steps) else (lambda: total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total() - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epochs_within_budget(budget_minutes: float, first_epoch_minutes: float, epochs: int) -> int:
    """How many epochs of the measured length fit the budget (at least 1, at most `epochs`)."""
    if first_epoch_minutes <= 0:
        return epochs
    return max(1, min(epochs, int(budget_minutes // first_epoch_minutes)))


def mixing_loss_forward(
    loss_fn: LossFn, mixup_alpha: float, cutmix_alpha: float, prob: float, seed: int = 0, channels_last: bool = False
) -> Callable[[nn.Module, Batch, int], torch.Tensor]:
    """A `loss_forward` that mixes a share `prob` of the batches by mixup (Zhang et al. 2018) or cutmix (Yun et al.
    2019), with λ ~ Beta(α, α), and mixes the loss of the two label sets by the same λ."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixing needs mixup_alpha or cutmix_alpha above 0")
    rng = np.random.default_rng(seed)

    def loss_forward(model: nn.Module, batch: Batch, epoch: int) -> torch.Tensor:
        images, labels = batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if rng.random() >= prob:
            return loss_fn(model(images).float(), labels)
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
        perm = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
        if use_cutmix:
            height, width = images.shape[-2:]
            cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            images = images.clone()
            images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        else:
            images = lam * images + (1 - lam) * images[perm]
        logits = model(images).float()
        return lam * loss_fn(logits, labels) + (1 - lam) * loss_fn(logits, labels[perm])

    return loss_forward


def ema_update(decay: float) -> Callable[[list, list, Any], None]:
    """AveragedModel's update for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)) after n updates
    (as TensorFlow's ExponentialMovingAverage with num_updates), so short runs are not dominated by the start."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: Any) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        for ema_param, param in floats:
            ema_param.lerp_(param, weight)
        for ema_param, param in zip(ema_params, params):
            if not ema_param.is_floating_point():  # BatchNorm's num_batches_tracked
                ema_param.copy_(param)

    return update


def channels_last_forward(forward: ForwardFn) -> ForwardFn:
    """`forward` with the images of each batch in channels-last layout."""

    def wrapped(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return forward(model, (images.contiguous(memory_format=torch.channels_last), labels))

    return wrapped


def make_accelerator(settings: TrainSettings):
    """An Accelerator for the requested device and precision (float32 on CPU unless asked)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available")
    mixed = settings.mixed_precision
    if cpu and mixed == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; use bf16 or 'no' on CPU")
    from accelerate.utils import DataLoaderConfiguration

    # A seedable sampler makes each epoch's shuffle a function of (seed, epoch): a resumed run sees the same order.
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    set_seed(settings.seed)
    return accelerator


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: DataLoader, accelerator, forward: ForwardFn
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a (prepared) loader, gathered from every process."""
    model.eval()
    all_probs, all_labels = [], []
    for batch in loader:
        logits, labels = forward(model, batch)
        probs = torch.softmax(logits.float(), dim=-1)
        probs, labels = accelerator.gather_for_metrics((probs, labels))
        all_probs.append(probs.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_probs).numpy(), torch.cat(all_labels).numpy()


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: LossFn,
    settings: TrainSettings,
    run_dir: str | Path,
    accelerator=None,
    forward: ForwardFn = default_forward,
    on_epoch_start: Callable[[int, int], None] | None = None,
    loss_forward: Callable[[nn.Module, Batch, int], torch.Tensor] | None = None,
) -> FitResult:
    """Train with AdamW + warm-up/cosine, early-stop on validation balanced accuracy, checkpoint every epoch.

    With `settings.ema_decay` > 0 an exponential moving average of the weights (buffers included) is kept; it is
    what is validated, selected and returned; the raw weights of the selected epoch go to
    `checkpoints/best_raw.safetensors` and those of the last epoch to `checkpoints/last_raw.safetensors`. With
    `settings.time_budget_minutes` and `settings.schedule_to_budget` the first epoch's duration fixes how many epochs
    fit the budget, and the cosine decays to 0 at their end.
    `on_epoch_start(epoch, total_epochs)` lets a task change per-epoch state (SC-MIL's β schedule);
    `loss_forward(model, batch, epoch)` replaces `loss_fn(forward(...))` for losses that need more than logits.
    A run directory that holds `checkpoints/last` is resumed when `settings.resume` is true.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    accelerator = accelerator or make_accelerator(settings)
    main = accelerator.is_main_process
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader)
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    state = {"epoch": 0, "best_epoch": -1, "best_score": -1.0, "history": [], "bad_epochs": 0,
             "planned_epochs": settings.epochs, "train_seconds": 0.0}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(lambda: max(1, steps_per_epoch * state["planned_epochs"]),
                      int(settings.warmup_epochs * steps_per_epoch)),
    )
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if settings.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=ema_update(settings.ema_decay),
                            use_buffers=True)

    last = ckpt_dir / "last"
    if settings.resume and (last / "trainer_state.json").is_file():
        accelerator.load_state(str(last))
        state = {**state, **json.loads((last / "trainer_state.json").read_text())}
        if ema is not None and (last / EMA_FILE).is_file():
            ema.module.load_state_dict(load_file(last / EMA_FILE, device="cpu"))
            ema.n_averaged.fill_(int(state.get("ema_updates", 1)))
        log.info("resumed from %s after epoch %d", last, state["epoch"])
    scored = ema.module if ema is not None else model

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    images_seen, train_seconds, fit_started = 0, 0.0, time.perf_counter()
    for epoch in range(state["epoch"], settings.epochs):
        if epoch >= state["planned_epochs"]:
            break
        if state["bad_epochs"] >= settings.patience:
            log.info("early stop: no better validation balanced accuracy for %d epochs", settings.patience)
            break
        elapsed_min = (time.perf_counter() - fit_started) / 60
        if settings.time_budget_minutes is not None and elapsed_min >= settings.time_budget_minutes:
            log.info("time budget of %.0f min reached after %d epochs", settings.time_budget_minutes, epoch)
            break
        if on_epoch_start is not None:
            on_epoch_start(epoch, settings.epochs)
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        running, n_batches, started = 0.0, 0, time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not main, leave=False)
        for step, batch in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            with accelerator.autocast():
                if loss_forward is not None:
                    loss = loss_forward(model, batch, epoch)
                else:
                    logits, labels = forward(model, batch)
                    loss = loss_fn(logits.float(), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            running += loss.item()
            n_batches += 1
            images_seen += len(batch[1]) * accelerator.num_processes
            bar.update(1)
            bar.set_postfix(loss=f"{running / n_batches:.3f}")
        bar.close()
        train_seconds += time.perf_counter() - started
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.perf_counter() - started

        probs, labels = predict_loader(scored, val_loader, accelerator, forward)
        score = float(balanced_accuracy_score(labels, probs.argmax(1)))
        val_loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
        record = {
            "epoch": epoch + 1,
            "train_loss": running / max(1, n_batches),
            "val_balanced_accuracy": score,
            "val_loss": val_loss,
            "lr": scheduler.get_last_lr()[0],
            "minutes": (time.perf_counter() - fit_started) / 60,
        }
        state["history"].append(record)
        # Balanced accuracy saturates on small validation sets (SC-MIL reaches 1.0 while its classifier is still
        # barely trained): a tie goes to the epoch with the lower validation loss.
        improved = score > state["best_score"] or (
            score == state["best_score"] and val_loss < state.get("best_val_loss", float("inf"))
        )
        if improved:
            state.update(best_score=score, best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            if main:
                _save_weights(accelerator.unwrap_model(scored), ckpt_dir / "best.safetensors")
                if ema is not None:  # the raw weights of the same epoch, so EMA can be compared at equal epochs
                    _save_weights(accelerator.unwrap_model(model), ckpt_dir / BEST_RAW_FILE)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if ema is not None:
            state["ema_updates"] = int(ema.n_averaged)
        if (epoch == 0 and settings.schedule_to_budget and settings.time_budget_minutes is not None
                and state["planned_epochs"] == settings.epochs):
            epoch_minutes = (time.perf_counter() - fit_started) / 60
            state["planned_epochs"] = epochs_within_budget(settings.time_budget_minutes, epoch_minutes,
                                                           settings.epochs)
            log.info("epoch 1 took %.1f min: %d of %d epochs fit the %.0f-minute budget; the cosine ends there",
                     epoch_minutes, state["planned_epochs"], settings.epochs, settings.time_budget_minutes)
        _checkpoint(accelerator, ckpt_dir, state, {EMA_FILE: ema.module} if ema is not None else None)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
        log.info("epoch %d: loss %.4f, val balanced accuracy %.4f", epoch + 1, record["train_loss"], score)

    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    raw = None
    if ema is not None:
        raw = ckpt_dir / "last_raw.safetensors"
        if main:
            _save_weights(unwrapped, raw)
    best = ckpt_dir / "best.safetensors"
    if best.is_file():
        unwrapped.load_state_dict(load_file(best, device="cpu"))
    return FitResult(
        model=unwrapped,
        best_epoch=state["best_epoch"],
        best_score=state["best_score"],
        history=state["history"],
        train_images_per_s=images_seen / train_seconds if train_seconds else float("nan"),
        planned_epochs=state["planned_epochs"],
        train_minutes=state.get("train_seconds", 0.0) / 60,
        raw_weights=raw,
    )


def _save_weights(model: nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _checkpoint(accelerator, ckpt_dir: Path, state: dict, extra: dict[str, nn.Module] | None = None) -> None:
    """Write `checkpoints/last` atomically: save into a fresh folder, then swap it in."""
    tmp = ckpt_dir / f".last-{state['epoch']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Every rank writes its own random state into `tmp`: only swap the folder in once all of them have.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (extra or {}).items():
            _save_weights(module, tmp / name)
        _atomic_json(tmp / "trainer_state.json", state)
        old = ckpt_dir / ".last-old"
        last = ckpt_dir / "last"
        if last.exists():
            os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def predict_probs(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray, float]:
    """(probs, labels, images/s of the forward passes) over a loader of (images, labels), single process."""
    device = next(model.parameters()).device
    model.eval()
    probs, labels, seconds = [], [], 0.0
    for images, targets in loader:
        started = time.perf_counter()
        logits = model(images.to(device))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        seconds += time.perf_counter() - started
        labels.append(np.asarray(targets))
    n = sum(len(p) for p in probs)
    return np.concatenate(probs), np.concatenate(labels), n / seconds if seconds else float("nan")


def predict_dataset(model: nn.Module, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, float]:
    """(probs, labels, images/s) for a dataset on the model's device, single process."""
    return predict_probs(model, DataLoader(dataset, batch_size=batch_size, shuffle=False))


def fit_training_ood(model: nn.Module, train_df: pd.DataFrame, val_ds, class_names: list[str], transform,
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


def train_from_config(config: RunConfig, run_dir: str | Path, manifest_path: str | Path | None = None) -> Path:
    """Train the configured image classifier on a run's manifest; calibrate it; write the bundle and the report."""
    from models.bundle import save_bundle
    from models.registry import build_model, default_normalization
    from pipelines.balancing import build_loss, build_sampler
    from pipelines.calibration import calibrate_and_score
    from pipelines.data import ImageDataset
    from pipelines.evaluation import (
        add_score_intervals,
        save_plots,
        save_reliability_comparison,
        write_report,
        write_training_images,
    )
    from pipelines.manifest import SPLITS, class_names_of, manifest_sha256, read_manifest
    from pipelines.provenance import code_version
    from pipelines.transforms import eval_transform, train_transform

    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path or run_dir / "manifest.csv")
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
    val_df = manifest[(manifest.split == "val") & (manifest.source == "real")]
    test_df = manifest[(manifest.split == "test") & (manifest.source == "real")]
    settings, model_cfg = config.training, config.model
    counts = class_counts(train_df.label, class_names)
    missing = [name for name, n in zip(class_names, counts) if n == 0]
    if missing:
        raise ValueError(f"classes {missing} have no training images in '{manifest_path}'")

    accelerator = make_accelerator(settings)
    norm = default_normalization(model_cfg.name)
    constancy = None if model_cfg.color_constancy == "none" else model_cfg.color_constancy
    model = build_model(
        model_cfg.name,
        len(class_names),
        model_cfg.img_size,
        checkpoint=model_cfg.checkpoint,
        pretrained=model_cfg.pretrained,
        **({"pretrained_path": model_cfg.pretrained_path} if model_cfg.pretrained_path else {}),
        **model_cfg.kwargs,
    )
    cache_dir = run_dir / "image_cache" if settings.cache_images else None
    train_ds = ImageDataset(
        train_df, class_names, train_transform(model_cfg.img_size, **norm, color_constancy=constancy),
        seed=settings.seed, cache_dir=cache_dir,
    )
    evaluate = eval_transform(model_cfg.img_size, **norm, color_constancy=constancy)
    val_ds = ImageDataset(val_df, class_names, evaluate, cache_dir=cache_dir)
    sampler = build_sampler(train_ds.labels, len(class_names), settings.sampler, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=settings.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=settings.num_workers,
        drop_last=len(train_ds) > settings.batch_size,
        generator=generator,
        persistent_workers=settings.num_workers > 0,
    )
    val_loader = DataLoader(val_ds, batch_size=settings.batch_size * 2, num_workers=settings.num_workers)
    loss_fn = build_loss(
        settings.loss,
        counts,
        settings.class_weighting,
        settings.effective_beta,
        settings.focal_gamma,
        settings.logit_tau,
        settings.label_smoothing,
    ).to(accelerator.device)
    forward = default_forward
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        forward = channels_last_forward(forward)
    loss_forward = None
    if settings.mixup_alpha > 0 or settings.cutmix_alpha > 0:
        loss_forward = mixing_loss_forward(loss_fn, settings.mixup_alpha, settings.cutmix_alpha, settings.mix_prob,
                                           settings.seed, settings.channels_last)
    log.info(
        "training %s on %d images (%s), validating on %d",
        model_cfg.name,
        len(train_ds),
        dict(zip(class_names, counts)),
        len(val_ds),
    )
    result = fit(model, train_loader, val_loader, loss_fn, settings, run_dir, accelerator, forward=forward,
                 loss_forward=loss_forward)
    if not accelerator.is_main_process:
        return run_dir / "bundle"

    model = result.model.to(memory_format=torch.contiguous_format)
    malignant = [c for c in config.data.malignant_classes if c in class_names]
    report_dir = run_dir / "report"
    test_ds = ImageDataset(test_df, class_names, evaluate, cache_dir=cache_dir) if len(test_df) else None
    scores = calibrate_and_score(model, val_ds, test_ds, class_names, malignant, settings.tta, settings.calibration,
                                 settings.target_sensitivity, logits_out=report_dir / "logits.npz")
    add_score_intervals(scores, class_names, malignant)  # 95 % bootstrap intervals for the card and the report
    ood = fit_training_ood(model, train_df, val_ds, class_names, evaluate, settings.seed)
    source_counts = {
        name: {src: int(((train_df.label == name) & (train_df.source == src)).sum()) for src in ("real", "synthetic")}
        for name in class_names
    }
    card: dict[str, Any] = {
        "task": "image",
        "architecture": {"name": model_cfg.name, "kwargs": architecture_kwargs(model, model_cfg.kwargs)},
        "class_names": class_names,
        "malignant_classes": malignant,
        "input_size": model_cfg.img_size,
        "normalization": norm,
        "preprocessing": {"color_constancy": constancy},
        "inference": {"tta": scores.tta},
        "calibration": scores.calibration,
        "operating_threshold": scores.threshold["threshold"] if scores.threshold else None,
        "threshold_metrics": scores.threshold,
        "metrics": scores.card_metrics(),
        "manifest_sha256": manifest_sha256(manifest_path),
        "training": {
            "images": len(train_ds),
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
            "num_processes": accelerator.num_processes,  # the effective batch is batch_size x num_processes
        },
        "code_version": code_version(),
    }
    # Every other trainer setting (epochs, warm-up, patience, budget, loss parameters, mix_prob, ...), as configured.
    card["training"].update({k: v for k, v in settings.model_dump(mode="json").items() if k not in card["training"]})
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
        save_plots(scores.test_labels, scores.test_probs, class_names, malignant, report_dir)
        save_reliability_comparison(scores.test_labels, scores.test_probs_uncalibrated, scores.test_probs,
                                    report_dir / "reliability_calibration.png", "test split")
        write_report(scores.test_metrics, report_dir, f"{model_cfg.name} on the held-out test split", extra)
    else:
        save_plots(scores.val_labels, scores.val_probs, class_names, malignant, report_dir)
        save_reliability_comparison(scores.val_labels, scores.val_probs_uncalibrated, scores.val_probs,
                                    report_dir / "reliability_calibration.png", "validation split")
        write_report(scores.val_metrics, report_dir, f"{model_cfg.name} on the validation split", extra)
    card["metrics"]["train_images_per_s"] = result.train_images_per_s
    if ood is not None:
        card["ood"] = ood.block
    bundle_dir = save_bundle(run_dir / "bundle", model.cpu(), card, ood=ood.torch_tensors() if ood else None)
    write_training_images(bundle_dir, train_df[train_df.source == "real"])
    log.info("bundle written to %s, report to %s", bundle_dir, report_dir / "report.md")
    return bundle_dir
