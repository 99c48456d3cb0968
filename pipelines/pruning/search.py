"""Pruning a network to a FLOPs target with Torch-Pruning: one pruning step, the channel-ratio search, per-layer
floors and channel rounding, fixed per-layer ratios, and BatchNorm re-estimation after each step."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.pruning.importance import LayerwiseImportance, build_importance, conv_layers
from pipelines.pruning.measure import count_flops, count_parameters

__all__ = [
    "PruneResult",
    "kept_channels",
    "prune_once",
    "prune_to_flops",
    "recalibrate_batchnorm",
]

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What `prune_to_flops` returns: the pruned model and how each stage went."""

    model: nn.Module
    base_flops: int
    flops: int
    stages: list[dict[str, float]] = field(default_factory=list)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops / self.base_flops


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The classification head's outputs are the classes: never prune them."""
    head = getattr(model, "head", None)
    return [head] if isinstance(head, nn.Module) else []


def prune_once(
    model: nn.Module,
    importance: LayerwiseImportance,
    ratio: float,
    input_size: int,
    min_channels: dict[str, int],
    global_pruning: bool = False,
    round_to: int | None = None,
    layer_ratios: dict[str, float] | None = None,
) -> nn.Module:
    """Remove `ratio` of the channels (per group, or globally) in place, never below a layer's `min_channels`.

    With `round_to`, every pruned layer keeps a multiple of `round_to` channels (rounded up, so never fewer than
    asked; a layer of `round_to` channels or fewer is left whole): SIMD kernels run channel blocks of 8-16, and a
    width of 22 costs about what 24 does. `layer_ratios` (conv name -> ratio) overrides `ratio` for the groups
    those convs lead.
    """
    import torch_pruning as tp

    from models.pruned import sync_widths

    if ratio <= 0 and not any(layer_ratios.values() if layer_ratios else ()):
        return model
    importance.bind(model)
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=ratio, global_pruning=global_pruning,
        ignored_layers=_ignored_layers(model), max_pruning_ratio=1.0,
        pruning_ratio_dict={modules[name]: r for name, r in (layer_ratios or {}).items()} or None,
    )
    names = {module: name for name, module in model.named_modules()}
    # Torch-Pruning silently skips a group whose pruning would empty a layer; let it through so that
    # _respect_floor prunes it down to the layer's minimum instead, then apply Torch-Pruning's check.
    check = pruner.DG.check_pruning_group
    pruner.DG.check_pruning_group = lambda group: True
    for group in pruner.step(interactive=True):
        group = _respect_floor(pruner, group, importance, names, min_channels, round_to)
        if group is not None and check(group):
            group.prune()
    pruner.DG.check_pruning_group = check
    model.train(was_training)
    sync_widths(model)
    return model


def kept_channels(current: int, kept: int, floor: int, round_to: int | None = None) -> int:
    """How many of a layer's `current` filters survive when pruning would keep `kept`: at least `floor`, and with
    `round_to` a multiple of it, rounded up (a layer of at most `round_to` filters keeps them all)."""
    kept = max(kept, floor)
    if round_to and round_to > 1 and kept % round_to:
        kept = current if current <= round_to else min(current, math.ceil(kept / round_to) * round_to)
    return kept


def _respect_floor(pruner: Any, group: Any, importance: LayerwiseImportance, names: dict,
                   min_channels: dict[str, int], round_to: int | None = None) -> Any:
    """Shrink a pruning group so that every coupled conv keeps `kept_channels` filters (its floor, its rounding)."""
    from torch_pruning.pruner import function

    idxs = [int(i) for i in group[0].idxs]
    keep_at_least = 0
    for dep, dep_idxs in group:
        if dep.pruning_fn == function.prune_conv_out_channels and names.get(dep.layer) in min_channels:
            current = dep.layer.out_channels
            kept = current - len(dep_idxs)
            target = kept_channels(current, kept, min_channels[names[dep.layer]], round_to)
            keep_at_least = max(keep_at_least, target - kept)
    if keep_at_least <= 0:
        return group
    if keep_at_least >= len(idxs):
        return None
    scores = importance(group)
    order = torch.argsort(scores) if scores is not None else torch.arange(len(idxs))
    pruned = [idxs[int(i)] for i in order[: len(idxs) - keep_at_least]]
    root = group[0].dep
    return pruner.DG.get_pruning_group(root.target.module, root.handler, pruned)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy on the meta device (tracing, pruning and FLOP counting without arithmetic)."""
    return copy.deepcopy(model).to("meta")


def _search_ratio(
    model: nn.Module,
    importance: LayerwiseImportance,
    target_flops: float,
    input_size: int,
    min_channels: dict[str, int],
    global_pruning: bool,
    max_ratio: float,
    iterations: int = 10,
    round_to: int | None = None,
    layer_ratios: dict[str, float] | None = None,
) -> tuple[float, int]:
    """Bisect the channel ratio whose pruning (on a copy) brings FLOPs just under `target_flops`."""
    def flops_at(ratio: float) -> int:
        trial = prune_once(_meta_copy(model), importance, ratio, input_size, min_channels, global_pruning, round_to,
                           layer_ratios)
        return count_flops(trial, input_size)

    lo, hi = 0.0, max_ratio
    hi_flops = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        flops = flops_at(mid)
        if flops <= target_flops:
            hi, hi_flops = mid, flops
        else:
            lo = mid
    if hi_flops is None:
        hi_flops = flops_at(hi)
        if hi_flops > target_flops:
            log.warning("even pruning %.0f%% of channels leaves %.3g FLOPs > target %.3g", 100 * hi, hi_flops,
                        target_flops)
    importance.bind(model)
    return hi, hi_flops


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], device: str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean/variance from `batches` (cumulative average); returns #images.

    Pruning changes what each kept channel sees, so the old running statistics no longer match; with MONAI's
    EfficientNet momentum of 0.01 a short fine-tune barely moves them and eval-mode outputs collapse.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over all batches
    was_training = model.training
    model.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device))
                n += images.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return n


def _check_arguments(flops_reduction: float, steps: int, max_layer_pruning: float, round_to: int | None,
                     layer_ratios: dict[str, float], convs: Iterable[str]) -> None:
    """Raise ValueError on a `prune_to_flops` argument out of its range."""
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to is {round_to}; expected a channel multiple of at least 1 (e.g. 8)")
    if not 0 < flops_reduction < 1:
        raise ValueError(f"flops_reduction is {flops_reduction}; expected a fraction between 0 and 1 (e.g. 0.5)")
    if steps < 1:
        raise ValueError(f"steps is {steps}; at least 1 prune -> fine-tune stage is required")
    if not 0 < max_layer_pruning < 1:
        raise ValueError(f"max_layer_pruning is {max_layer_pruning}; expected a fraction in (0, 1)")
    convs = set(convs)
    for name, ratio in layer_ratios.items():
        if name not in convs:
            raise ValueError(f"layer_ratios names '{name}', which is not a convolution of this model; expected one "
                             f"of {sorted(convs)}")
        if not 0 <= ratio < 1:
            raise ValueError(f"layer_ratios['{name}'] is {ratio}; expected a fraction of its filters in [0, 1)")


def _stage_ratios(model: nn.Module, layer_ratios: dict[str, float], original: dict[str, int], stage: int,
                  steps: int) -> dict[str, float]:
    """The Torch-Pruning ratio of each fixed layer in this stage: after it, the layer keeps
    round(original * (1 - q * stage / steps)) filters."""
    convs = conv_layers(model)
    ratios = {}
    for name, q in layer_ratios.items():
        current = convs[name].out_channels
        keep = min(current, max(1, round(original[name] * (1 - q * stage / steps))))
        # Torch-Pruning keeps int(current * (1 - ratio)), hence the half filter
        ratios[name] = max(0.0, 1 - (keep + 0.5) / current)
    return ratios


def prune_to_flops(
    model: nn.Module,
    method: str,
    flops_reduction: float,
    input_size: int,
    calibration: Iterable[Any] | None = None,
    steps: int = 1,
    global_pruning: bool = False,
    max_layer_pruning: float = 0.9,
    fine_tune: Callable[[nn.Module, int], nn.Module | None] | None = None,
    seed: int = 0,
    batchnorm_batches: Iterable[Any] | None = None,
    round_to: int | None = None,
    layer_ratios: dict[str, float] | None = None,
) -> PruneResult:
    """Prune `model` in place until its FLOPs fall by `flops_reduction`, in `steps` prune -> fine-tune stages.

    Each stage re-scores the filters of the current model (re-running calibration for data-driven methods),
    finds the channel ratio that reaches that stage's FLOPs target, prunes and calls `fine_tune(model, stage)`.
    No conv ever keeps fewer than max(1, ceil((1 - max_layer_pruning) * its original filters)).
    BatchNorm statistics are re-estimated after each prune and each fine-tune from `batchnorm_batches`, which
    should follow the training distribution (a random training sample; the class-balanced calibration set
    shifts them towards the rare classes), falling back to `calibration`. `round_to`: see `prune_once`.

    `layer_ratios` (conv name -> fraction of its original filters to remove by the last stage, in equal parts per
    stage) fixes those layers' widths, and the searched ratio covers the rest. Use it to spend the FLOPs budget
    where time goes: at 224 px a plain CNN's first, full-resolution stage takes far more of the batch-1 time than
    of the FLOPs (docs/pruning.md).
    """
    layer_ratios = dict(layer_ratios or {})
    original = {name: conv.out_channels for name, conv in conv_layers(model).items()}
    _check_arguments(flops_reduction, steps, max_layer_pruning, round_to, layer_ratios, original)
    device = str(next(model.parameters()).device)
    importance = build_importance(method, seed=seed, device=device)
    if importance.needs_data and calibration is None:
        raise ValueError(f"pruning method '{method}' needs calibration images; none were given")
    min_channels = {name: max(1, math.ceil((1 - max_layer_pruning) * filters)) for name, filters in original.items()}
    base_flops = count_flops(model, input_size)
    result = PruneResult(model=model, base_flops=base_flops, flops=base_flops)
    norm_batches = batchnorm_batches if batchnorm_batches is not None else calibration
    for stage in range(1, steps + 1):
        target = base_flops * (1 - flops_reduction * stage / steps)
        started = time.perf_counter()
        importance.calibrate(model, calibration)
        stage_ratios = _stage_ratios(model, layer_ratios, original, stage, steps)
        ratio, _ = _search_ratio(model, importance, target, input_size, min_channels, global_pruning, max_layer_pruning,
                                 round_to=round_to, layer_ratios=stage_ratios)
        prune_once(model, importance, ratio, input_size, min_channels, global_pruning, round_to, stage_ratios)
        if norm_batches is not None:
            recalibrate_batchnorm(model, norm_batches, device)
        flops = count_flops(model, input_size)
        record = {"stage": stage, "channel_ratio": ratio, "flops": flops, "flops_reduction": 1 - flops / base_flops,
                  "params": count_parameters(model), "seconds": time.perf_counter() - started}
        log.info("stage %d/%d (%s): pruned %.1f%% of channels -> %.1f%% fewer FLOPs", stage, steps, method,
                 100 * ratio, 100 * record["flops_reduction"])
        if fine_tune is not None:
            tuned = fine_tune(model, stage)
            model = tuned if tuned is not None else model
            if norm_batches is not None:  # a short fine-tune barely moves running stats (momentum 0.01)
                recalibrate_batchnorm(model, norm_batches, str(next(model.parameters()).device))
        result.stages.append(record)
        result.model, result.flops = model, flops
    return result
