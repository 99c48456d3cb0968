"""The project's trainer: `fit` (AdamW, warm-up + cosine, EMA, early stopping, resumable checkpoints) under
Hugging Face Accelerate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipelines.config import TrainSettings
from pipelines.training.accelerator import make_accelerator
from pipelines.training.checkpoints import (
    BEST_FILE,
    BEST_RAW_FILE,
    EMA_FILE,
    LAST_RAW_FILE,
    resume_checkpoint,
    save_weights,
    write_checkpoint,
)
from pipelines.training.forward import Batch, ForwardFn, LossFn, default_forward
from pipelines.training.schedule import ema_update, epochs_within_budget, warmup_cosine

__all__ = ["FitResult", "fit", "predict_loader"]

log = logging.getLogger(__name__)

StepLoss = Callable[[nn.Module, Batch, int], torch.Tensor]


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


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: DataLoader, accelerator: Any, forward: ForwardFn
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


@dataclass
class _Loop:
    """The prepared objects and the resumable state of one `fit` call."""

    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    ckpt_dir: Path
    state: dict[str, Any]
    ema: Any = None  # torch.optim.swa_utils.AveragedModel
    writer: Any = None  # tensorboard SummaryWriter, main process only
    images_seen: int = 0
    train_seconds: float = 0.0  # of this call (state["train_seconds"] counts resumed runs too)

    @property
    def scored(self) -> nn.Module:
        """What is validated, selected and returned: the EMA when one is kept, else the model."""
        return self.ema.module if self.ema is not None else self.model


def _setup(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, settings: TrainSettings,
           run_dir: Path, accelerator: Any) -> _Loop:
    """Optimizer, schedule and EMA, prepared by the accelerator; resumed from `checkpoints/last` when asked."""
    ckpt_dir = run_dir / "checkpoints"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = len(train_loader)
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    state: dict[str, Any] = {"epoch": 0, "best_epoch": -1, "best_score": -1.0, "history": [], "bad_epochs": 0,
                             "planned_epochs": settings.epochs, "train_seconds": 0.0}
    # The total is read at every step, so re-planning `planned_epochs` to a time budget moves the cosine's end.
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
    if settings.resume:
        resume_checkpoint(accelerator, ckpt_dir, state, ema)
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    return _Loop(accelerator, model, optimizer, scheduler, train_loader, val_loader, steps_per_epoch, ckpt_dir,
                 state, ema, writer)


def _should_stop(state: dict[str, Any], epoch: int, settings: TrainSettings, fit_started: float) -> bool:
    """True when the planned epochs are done, patience ran out or the time budget is spent."""
    if epoch >= state["planned_epochs"]:
        return True
    if state["bad_epochs"] >= settings.patience:
        log.info("early stop: no better validation balanced accuracy for %d epochs", settings.patience)
        return True
    elapsed_min = (time.perf_counter() - fit_started) / 60
    if settings.time_budget_minutes is not None and elapsed_min >= settings.time_budget_minutes:
        log.info("time budget of %.0f min reached after %d epochs", settings.time_budget_minutes, epoch)
        return True
    return False


def _train_epoch(loop: _Loop, epoch: int, total_epochs: int, step_loss: StepLoss) -> float:
    """One pass over at most `steps_per_epoch` training batches; returns the mean training loss."""
    accelerator, model = loop.accelerator, loop.model
    model.train()
    if hasattr(loop.train_loader, "set_epoch"):
        loop.train_loader.set_epoch(epoch)
    if hasattr(loop.train_loader.dataset, "set_epoch"):
        loop.train_loader.dataset.set_epoch(epoch)
    running, n_batches = 0.0, 0
    bar = tqdm(total=loop.steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}",
               disable=not accelerator.is_main_process, leave=False)
    for step, batch in enumerate(loop.train_loader):
        if step >= loop.steps_per_epoch:
            break
        with accelerator.autocast():
            loss = step_loss(model, batch, epoch)
        accelerator.backward(loss)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.ema is not None:
            loop.ema.update_parameters(accelerator.unwrap_model(model))
        running += loss.item()
        n_batches += 1
        loop.images_seen += len(batch[1]) * accelerator.num_processes
        bar.update(1)
        bar.set_postfix(loss=f"{running / n_batches:.3f}")
    bar.close()
    return running / max(1, n_batches)


def _validate(loop: _Loop, forward: ForwardFn) -> tuple[float, float]:
    """(balanced accuracy, mean NLL) of the scored model on the validation loader."""
    probs, labels = predict_loader(loop.scored, loop.val_loader, loop.accelerator, forward)
    score = float(balanced_accuracy_score(labels, probs.argmax(1)))
    val_loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return score, val_loss


def _select(loop: _Loop, epoch: int, score: float, val_loss: float) -> None:
    """Keep the epoch's weights as the best when it improves; count it towards patience when it does not."""
    state = loop.state
    # Balanced accuracy saturates on small validation sets (SC-MIL reaches 1.0 while its classifier is still
    # barely trained): a tie goes to the epoch with the lower validation loss.
    improved = score > state["best_score"] or (
        score == state["best_score"] and val_loss < state.get("best_val_loss", float("inf"))
    )
    if not improved:
        state["bad_epochs"] += 1
        return
    state.update(best_score=score, best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
    if loop.accelerator.is_main_process:
        save_weights(loop.accelerator.unwrap_model(loop.scored), loop.ckpt_dir / BEST_FILE)
        if loop.ema is not None:  # the raw weights of the same epoch, so EMA can be compared at equal epochs
            save_weights(loop.accelerator.unwrap_model(loop.model), loop.ckpt_dir / BEST_RAW_FILE)


def _plan_to_budget(state: dict[str, Any], settings: TrainSettings, fit_started: float) -> None:
    """After the first epoch: how many epochs fit the time budget; the cosine then ends there."""
    if not (settings.schedule_to_budget and settings.time_budget_minutes is not None
            and state["planned_epochs"] == settings.epochs):
        return
    epoch_minutes = (time.perf_counter() - fit_started) / 60
    state["planned_epochs"] = epochs_within_budget(settings.time_budget_minutes, epoch_minutes, settings.epochs)
    log.info("epoch 1 took %.1f min: %d of %d epochs fit the %.0f-minute budget; the cosine ends there",
             epoch_minutes, state["planned_epochs"], settings.epochs, settings.time_budget_minutes)


def _end_epoch(loop: _Loop, record: dict[str, float]) -> None:
    """Checkpoint `last` (with the EMA), log the record to tensorboard and the log."""
    if loop.ema is not None:
        loop.state["ema_updates"] = int(loop.ema.n_averaged)
    write_checkpoint(loop.accelerator, loop.ckpt_dir, loop.state,
                     {EMA_FILE: loop.ema.module} if loop.ema is not None else None)
    if loop.writer is not None:
        for key, value in record.items():
            if key != "epoch":
                loop.writer.add_scalar(key, value, record["epoch"])
    log.info("epoch %d: loss %.4f, val balanced accuracy %.4f", record["epoch"], record["train_loss"],
             record["val_balanced_accuracy"])


def _finish(loop: _Loop) -> FitResult:
    """Load the best weights into the unwrapped model (keeping the last raw weights beside an EMA)."""
    if loop.writer is not None:
        loop.writer.close()
    loop.accelerator.wait_for_everyone()
    unwrapped = loop.accelerator.unwrap_model(loop.model)
    raw = None
    if loop.ema is not None:
        raw = loop.ckpt_dir / LAST_RAW_FILE
        if loop.accelerator.is_main_process:
            save_weights(unwrapped, raw)
    best = loop.ckpt_dir / BEST_FILE
    if best.is_file():
        unwrapped.load_state_dict(load_file(best, device="cpu"))
    state = loop.state
    return FitResult(
        model=unwrapped,
        best_epoch=state["best_epoch"],
        best_score=state["best_score"],
        history=state["history"],
        train_images_per_s=loop.images_seen / loop.train_seconds if loop.train_seconds else float("nan"),
        planned_epochs=state["planned_epochs"],
        train_minutes=state.get("train_seconds", 0.0) / 60,
        raw_weights=raw,
    )


def _plain_step_loss(forward: ForwardFn, loss_fn: LossFn) -> StepLoss:
    def step_loss(model: nn.Module, batch: Batch, epoch: int) -> torch.Tensor:
        logits, labels = forward(model, batch)
        return loss_fn(logits.float(), labels)

    return step_loss


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: LossFn,
    settings: TrainSettings,
    run_dir: str | Path,
    accelerator: Any = None,
    forward: ForwardFn = default_forward,
    on_epoch_start: Callable[[int, int], None] | None = None,
    loss_forward: StepLoss | None = None,
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
    accelerator = accelerator or make_accelerator(settings)
    loop = _setup(model, train_loader, val_loader, settings, Path(run_dir), accelerator)
    step_loss = loss_forward or _plain_step_loss(forward, loss_fn)
    fit_started = time.perf_counter()
    for epoch in range(loop.state["epoch"], settings.epochs):
        if _should_stop(loop.state, epoch, settings, fit_started):
            break
        if on_epoch_start is not None:
            on_epoch_start(epoch, settings.epochs)
        started = time.perf_counter()
        train_loss = _train_epoch(loop, epoch, settings.epochs, step_loss)
        seconds = time.perf_counter() - started
        loop.train_seconds += seconds
        loop.state["train_seconds"] = loop.state.get("train_seconds", 0.0) + seconds
        score, val_loss = _validate(loop, forward)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_balanced_accuracy": score,
            "val_loss": val_loss,
            "lr": loop.scheduler.get_last_lr()[0],
            "minutes": (time.perf_counter() - fit_started) / 60,
        }
        loop.state["history"].append(record)
        _select(loop, epoch, score, val_loss)
        loop.state["epoch"] = epoch + 1
        if epoch == 0:
            _plan_to_budget(loop.state, settings, fit_started)
        _end_epoch(loop, record)
    return _finish(loop)
