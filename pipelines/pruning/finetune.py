"""Fine-tuning after each pruning stage: the trainer settings, distillation from the unpruned net, and the
`fine_tune(model, stage)` callback `prune_to_flops` calls (the project's trainer, `pipelines.training.fit`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import PruningConfig, TrainSettings

__all__ = [
    "distillation_for", "distillation_loss", "fine_tune_settings", "stage_fine_tuner", "stage_train_loaders",
]

LossForward = Callable[[nn.Module, Any, int], torch.Tensor]


def distillation_loss(
    teacher: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: float,
    temperature: float = 2.0, class_weights: torch.Tensor | None = None,
) -> LossForward:
    """A `fit(loss_forward=...)` loss: the task's (cost-sensitive) loss plus knowledge distillation from `teacher`,

        loss_fn(z_s, y) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    The unpruned net's soft outputs carry its class balance and its near-miss classes, which the few rare-class
    labels alone do not; the T^2 keeps the gradient scale independent of T. The teacher is frozen.

    The KL is averaged over the batch; with `class_weights` (one per class, e.g. the cost-sensitive loss's) it is
    the weighted mean sum_i w_{y_i} KL_i / sum_i w_{y_i}, the normalisation `nn.CrossEntropyLoss(weight=...)` uses,
    so the rare classes' images steer the distillation as much as they steer the task loss.

    References:
        Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531 (2015).
    """
    if weight < 0 or temperature <= 0:
        raise ValueError(f"distillation weight {weight} / temperature {temperature}: expected >= 0 and > 0")
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.ndim != 1 or not bool((class_weights > 0).all()):
            raise ValueError(f"distillation class weights {class_weights.tolist()}: expected one positive weight "
                             "per class")
    teacher = teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)

    def loss_forward(model: nn.Module, batch: Any, epoch: int) -> torch.Tensor:
        images, labels = batch
        logits = model(images).float()
        with torch.no_grad():
            target = teacher.to(images.device)(images).float()
        per_image = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                             F.log_softmax(target / temperature, dim=1), log_target=True, reduction="none").sum(1)
        if class_weights is None:
            soft = per_image.mean()
        else:
            if class_weights.numel() != logits.shape[1]:
                raise ValueError(f"distillation has {class_weights.numel()} class weights for a model with "
                                 f"{logits.shape[1]} outputs")
            w = class_weights.to(logits.device)[labels]
            soft = (w * per_image).sum() / w.sum()
        return loss_fn(logits, labels) + weight * temperature**2 * soft

    return loss_forward


def distillation_for(teacher: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     settings: PruningConfig, counts: Sequence[int], class_weighting: str) -> LossForward | None:
    """The fine-tuning loss `settings` ask for: distillation from a frozen copy of `teacher` (the unpruned net)
    on top of `loss_fn`, or None when distillation or fine-tuning is off.

    Args:
        counts: training images per class (for the class-weighted distillation term).
        class_weighting: the task loss's class weighting scheme (`pipelines.training.class_weights`).
    """
    from pipelines.training import class_weights

    if settings.distill_weight == 0 or settings.fine_tune_epochs == 0:
        return None
    weights = class_weights(counts, class_weighting) if settings.distill_class_weighted else None
    return distillation_loss(copy.deepcopy(teacher), loss_fn, settings.distill_weight, settings.distill_temperature,
                             class_weights=weights)


def fine_tune_settings(settings: PruningConfig, class_weighting: str, device: str = "cpu",
                       epochs: int | None = None) -> TrainSettings:
    """The trainer settings of the fine-tune after a pruning stage: `settings`' epochs (or `epochs`), learning rate,
    batch size, step cap and EMA decay (`fine_tune_ema`); no warm-up, no early stop."""
    epochs = settings.fine_tune_epochs if epochs is None else epochs
    return TrainSettings(
        epochs=epochs, batch_size=settings.batch_size, lr=settings.fine_tune_lr, warmup_epochs=0,
        patience=max(1, epochs), max_steps_per_epoch=settings.max_steps_per_epoch, device=device, seed=settings.seed,
        resume=False, class_weighting=class_weighting, ema_decay=settings.fine_tune_ema,
    )


def stage_train_loaders(dataset: Any, num_classes: int, sampler: str, settings: PruningConfig
                        ) -> Callable[[int], Any]:
    """`loader(stage)`: the training loader of each fine-tune stage, drawing with the bundle's own class sampler
    (`none`, `balanced` or `sqrt`, `pipelines.training.build_sampler`) seeded by settings.seed + stage.

    The sampler matters as much as the loss: a bundle's class weights were chosen for the class mix its sampler
    draws, and the same weights under plain shuffling tilt the net toward the majority class (on the shipped
    EfficientNet-Lite0, a pruned net fine-tuned that way predicted `nv` for 92 % of the test images).
    `dataset` has a `labels` list of class indices."""
    from torch.utils.data import DataLoader

    from pipelines.training import build_sampler

    def loader(stage: int) -> DataLoader:
        seed = settings.seed + stage
        drawn = build_sampler(dataset.labels, num_classes, sampler, seed)
        return DataLoader(dataset, batch_size=settings.batch_size, shuffle=drawn is None, sampler=drawn,
                          generator=torch.Generator().manual_seed(seed), drop_last=len(dataset) > settings.batch_size)

    return loader


def stage_fine_tuner(
    train_loader: Callable[[int], Any], val_loader: Any, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_settings: TrainSettings, run_dir: str | Path, distill: LossForward | None = None,
) -> Callable[[nn.Module, int], nn.Module]:
    """The `fine_tune(model, stage)` callback of `prune_to_flops`: `pipelines.training.fit` on `train_loader(stage)`
    (a loader per stage, so that each stage can draw its own order), selected on `val_loader`, with the
    `distill` loss when given; stage s trains in run_dir/stage{s}. Zero epochs returns the model unchanged."""
    from pipelines.training import fit

    def fine_tune(model: nn.Module, stage: int) -> nn.Module:
        if train_settings.epochs == 0:
            return model
        return fit(model, train_loader(stage), val_loader, loss_fn, train_settings, Path(run_dir) / f"stage{stage}",
                   loss_forward=distill).model

    return fine_tune
