"""Structural filter pruning with Torch-Pruning and a Beta-Rank importance (arXiv 2304.07461), `lesionlab prune`.

Beta-Rank scores filter k of a convolution as  ||W_k||_1 * beta_k,  where beta_k compares, at every output
position p, the spread of the input patch the filter sees with the spread of its response over a calibration set:

    beta_k = mean_p  sigma_in(k, p) / sigma_out(k, p)          (the paper's equation; method "beta-rank")
    beta_k = mean_p  sigma_out(k, p) / sigma_in(k, p)          (the authors' public code; "beta-rank-inverse")

sigma_out(k, p) is the standard deviation of output k at position p over all calibration images; sigma_in(k, p)
the standard deviation of all values in the (zero-padded) input window under that position, over the input
channels of k's group and all calibration images. Unlike the public code, the statistics are accumulated over
every calibration batch (not the last one), input windows are indexed along the spatial axes with the layer's own
stride, padding and dilation, and the calibration set is drawn class-balanced. Positions where the denominator is
zero (a window wholly in the padding, a dead filter) are left out of the mean; a filter with no valid position
gets beta = 0. Scores are divided by the layer's largest score, and a Torch-Pruning group (layers whose channels
must be removed together) averages the normalised scores of its convolutions.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

METHODS = ("beta-rank", "beta-rank-inverse", "l1", "hrank", "random")
DATA_METHODS = ("beta-rank", "beta-rank-inverse", "hrank")  # need calibration images
_VAR_RTOL = 1e-10  # variance below this fraction of the mean square counts as zero (float64 cancellation)


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every 2-D convolution of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------------------------------


class _BetaAccumulator:
    """Running float64 sums for sigma_out (per filter and position) and sigma_in (per channel group and position)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"Beta-Rank supports zero padding only; a conv has padding_mode={conv.padding_mode!r}")
        self.conv = conv
        self.n = 0
        self.out_sum = self.out_sq = self.in_sum = self.in_sq = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        conv = self.conv
        x = inputs[0].detach().double()
        y = output.detach().double().flatten(2)  # (N, C_out, L)
        per_group = conv.in_channels // conv.groups
        ones = torch.ones(conv.groups, per_group, *conv.kernel_size, dtype=torch.float64, device=x.device)
        window = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        s = F.conv2d(x, ones, **window).flatten(2)  # (N, groups, L): sum of each window's values
        s2 = F.conv2d(x * x, ones, **window).flatten(2)
        if s.shape[-1] != y.shape[-1]:
            raise RuntimeError(f"input windows ({s.shape[-1]}) and outputs ({y.shape[-1]}) disagree in number")
        if self.out_sum is not None and self.out_sum.shape[-1] != y.shape[-1]:
            raise ValueError("calibration images must all have the same size (the output grid changed)")
        sums = (y.sum(0), (y * y).sum(0), s.sum(0), s2.sum(0))
        if self.out_sum is None:
            self.out_sum, self.out_sq, self.in_sum, self.in_sq = sums
        else:
            self.out_sum += sums[0]
            self.out_sq += sums[1]
            self.in_sum += sums[2]
            self.in_sq += sums[3]
        self.n += y.shape[0]

    def sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_in per filter and position, sigma_out per filter and position), both (C_out, L)."""
        conv = self.conv
        window_size = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        count_in = self.n * window_size
        mean_out, sq_out = self.out_sum / self.n, self.out_sq / self.n
        mean_in, sq_in = self.in_sum / count_in, self.in_sq / count_in
        var_out = (sq_out - mean_out**2).clamp_min(0)
        var_in = (sq_in - mean_in**2).clamp_min(0)
        var_out = torch.where(var_out > _VAR_RTOL * sq_out, var_out, torch.zeros_like(var_out))
        var_in = torch.where(var_in > _VAR_RTOL * sq_in, var_in, torch.zeros_like(var_in))
        group_of_filter = torch.arange(conv.out_channels, device=var_in.device) // (conv.out_channels // conv.groups)
        return var_in.sqrt()[group_of_filter], var_out.sqrt()


def beta_from_sigmas(sigma_in: torch.Tensor, sigma_out: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """beta_k = mean over valid positions of sigma_in/sigma_out (or sigma_out/sigma_in when `inverse`)."""
    num, den = (sigma_out, sigma_in) if inverse else (sigma_in, sigma_out)
    valid = den > 0
    ratio = torch.where(valid, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    n_valid = valid.sum(-1)
    return torch.where(n_valid > 0, ratio.sum(-1) / n_valid.clamp_min(1), torch.zeros_like(n_valid, dtype=num.dtype))


def _run_calibration(model: nn.Module, batches: Iterable[Any], hooks: dict[str, Callable], device: str) -> int:
    """Forward every calibration batch with the given forward hooks; returns the number of images."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", leave=False):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device))
                n += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if n < 2:
        raise ValueError(f"calibration needs at least 2 images (spreads are standard deviations); got {n}")
    return n


@torch.no_grad()
def beta_rank_scores(
    model: nn.Module, batches: Iterable[Any], inverse: bool = False, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Un-normalised Beta-Rank score ||W_k||_1 * beta_k of every filter of every conv, by layer name."""
    convs = conv_layers(model)
    accumulators = {name: _BetaAccumulator(conv) for name, conv in convs.items()}
    _run_calibration(model, batches, accumulators, device)
    scores = {}
    for name, acc in accumulators.items():
        if acc.n == 0:
            continue  # not on the forward path
        sigma_in, sigma_out = acc.sigmas()
        beta = beta_from_sigmas(sigma_in, sigma_out, inverse)
        l1 = convs[name].weight.detach().double().abs().flatten(1).sum(1)
        scores[name] = (l1 * beta).float().cpu()
    return scores


@torch.no_grad()
def hrank_scores(model: nn.Module, batches: Iterable[Any], device: str = "cpu") -> dict[str, torch.Tensor]:
    """HRank (Lin et al. 2020): the mean rank of each filter's output feature map over the calibration images."""
    convs = conv_layers(model)
    totals: dict[str, list] = {name: [None, 0] for name in convs}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            ranks = torch.linalg.matrix_rank(output.detach().float()).double().sum(0)
            entry = totals[name]
            entry[0] = ranks if entry[0] is None else entry[0] + ranks
            entry[1] += output.shape[0]

        return hook

    _run_calibration(model, batches, {name: hook_for(name) for name in convs}, device)
    return {name: (total / n).float().cpu() for name, (total, n) in totals.items() if n}


def l1_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L1 norm of every conv filter (Li et al. 2017), by layer name."""
    return {name: conv.weight.detach().abs().flatten(1).sum(1).float().cpu()
            for name, conv in conv_layers(model).items()}


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded uniform random scores per filter (the baseline every criterion must beat)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(conv.out_channels, generator=generator) for name, conv in conv_layers(model).items()}


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each layer's scores by the layer's largest (all-zero layers stay zero)."""
    out = {}
    for name, s in scores.items():
        top = s.max() if s.numel() else torch.tensor(0.0)
        out[name] = s / top if top > 0 else torch.zeros_like(s)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The Torch-Pruning importance
# --------------------------------------------------------------------------------------------------------------------


class FilterImportance:
    """A Torch-Pruning `Importance`: per-filter scores of each conv (by `method`), normalised per layer, averaged
    over the convolutions whose output channels a group couples. `calibrate(model, batches)` before each pruning."""

    def __init__(self, method: str = "beta-rank", seed: int = 0, device: str = "cpu") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown pruning method '{method}'; expected one of {list(METHODS)}")
        self.method = method
        self.seed = seed
        self.device = device
        self.scores: dict[str, torch.Tensor] = {}
        self._names: dict[nn.Module, str] = {}

    @property
    def needs_data(self) -> bool:
        return self.method in DATA_METHODS

    def calibrate(self, model: nn.Module, batches: Iterable[Any] | None = None) -> "FilterImportance":
        """Compute every conv's filter scores on the current `model` (and calibration `batches` if the method needs)."""
        if self.needs_data and batches is None:
            raise ValueError(f"pruning method '{self.method}' needs calibration images; none were given")
        if self.method == "beta-rank":
            raw = beta_rank_scores(model, batches, inverse=False, device=self.device)
        elif self.method == "beta-rank-inverse":
            raw = beta_rank_scores(model, batches, inverse=True, device=self.device)
        elif self.method == "hrank":
            raw = hrank_scores(model, batches, device=self.device)
        elif self.method == "l1":
            raw = l1_scores(model)
        else:
            raw = random_scores(model, self.seed)
        self.scores = normalize_per_layer(raw)
        self.bind(model)
        return self

    def bind(self, model: nn.Module) -> None:
        """Look layers up by name in `model` (a copy of the calibrated model shares the scores)."""
        self._names = {module: name for name, module in model.named_modules()}

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        from torch_pruning.pruner import function

        root = [int(i) for i in group[0].root_idxs]
        position = {r: i for i, r in enumerate(root)}
        total = torch.zeros(len(root), dtype=torch.float64)
        count = torch.zeros(len(root), dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn != function.prune_conv_out_channels:
                continue
            name = self._names.get(dep.layer)
            if name is None or name not in self.scores:
                continue
            scores = self.scores[name]
            if scores.numel() != dep.layer.out_channels:
                raise RuntimeError(f"scores of '{name}' are stale ({scores.numel()} for {dep.layer.out_channels} "
                                   "filters): call calibrate() on the current model before pruning")
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            where = torch.tensor([position[int(r)] for r in root_idxs])
            total.index_add_(0, where, scores[list(idxs)].double())
            count.index_add_(0, where, torch.ones(len(where), dtype=torch.float64))
        if not count.any():
            return None
        return (total / count.clamp_min(1)).float()


# --------------------------------------------------------------------------------------------------------------------
# Pruning to a FLOPs target
# --------------------------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """FLOPs of one forward pass at batch 1 (torch.utils.flop_counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


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
    importance: FilterImportance,
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
    from models.pruned import sync_widths

    sync_widths(model)
    return model


def kept_channels(current: int, kept: int, floor: int, round_to: int | None = None) -> int:
    """How many of a layer's `current` filters survive when pruning would keep `kept`: at least `floor`, and with
    `round_to` a multiple of it, rounded up (a layer of at most `round_to` filters keeps them all)."""
    kept = max(kept, floor)
    if round_to and round_to > 1 and kept % round_to:
        kept = current if current <= round_to else min(current, math.ceil(kept / round_to) * round_to)
    return kept


def _respect_floor(pruner: Any, group: Any, importance: FilterImportance, names: dict, min_channels: dict[str, int],
                   round_to: int | None = None):
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
    importance: FilterImportance,
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
    lo, hi = 0.0, max_ratio
    hi_flops = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        trial = prune_once(_meta_copy(model), importance, mid, input_size, min_channels, global_pruning, round_to,
                           layer_ratios)
        flops = count_flops(trial, input_size)
        if flops <= target_flops:
            hi, hi_flops = mid, flops
        else:
            lo = mid
    if hi_flops is None:
        trial = prune_once(_meta_copy(model), importance, hi, input_size, min_channels, global_pruning, round_to,
                           layer_ratios)
        hi_flops = count_flops(trial, input_size)
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
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to is {round_to}; expected a channel multiple of at least 1 (e.g. 8)")
    if not 0 < flops_reduction < 1:
        raise ValueError(f"flops_reduction is {flops_reduction}; expected a fraction between 0 and 1 (e.g. 0.5)")
    if steps < 1:
        raise ValueError(f"steps is {steps}; at least 1 prune -> fine-tune stage is required")
    if not 0 < max_layer_pruning < 1:
        raise ValueError(f"max_layer_pruning is {max_layer_pruning}; expected a fraction in (0, 1)")
    importance = FilterImportance(method, seed=seed, device=str(next(model.parameters()).device))
    if importance.needs_data and calibration is None:
        raise ValueError(f"pruning method '{method}' needs calibration images; none were given")
    original = {name: conv.out_channels for name, conv in conv_layers(model).items()}
    min_channels = {name: max(1, math.ceil((1 - max_layer_pruning) * filters)) for name, filters in original.items()}
    layer_ratios = dict(layer_ratios or {})
    for name, ratio in layer_ratios.items():
        if name not in min_channels:
            raise ValueError(f"layer_ratios names '{name}', which is not a convolution of this model; expected one "
                             f"of {sorted(min_channels)}")
        if not 0 <= ratio < 1:
            raise ValueError(f"layer_ratios['{name}'] is {ratio}; expected a fraction of its filters in [0, 1)")
    base_flops = count_flops(model, input_size)
    result = PruneResult(model=model, base_flops=base_flops, flops=base_flops)
    norm_batches = batchnorm_batches if batchnorm_batches is not None else calibration
    for stage in range(1, steps + 1):
        target = base_flops * (1 - flops_reduction * stage / steps)
        started = time.perf_counter()
        importance.calibrate(model, calibration)
        # each fixed layer keeps round(original * (1 - q * stage / steps)) filters after this stage; Torch-Pruning
        # keeps int(current * (1 - ratio)), hence the half filter
        convs = conv_layers(model)
        stage_ratios = {}
        for name, q in layer_ratios.items():
            current = convs[name].out_channels
            keep = min(current, max(1, round(original[name] * (1 - q * stage / steps))))
            stage_ratios[name] = max(0.0, 1 - (keep + 0.5) / current)
        ratio, _ = _search_ratio(model, importance, target, input_size, min_channels, global_pruning, max_layer_pruning,
                                 round_to=round_to, layer_ratios=stage_ratios)
        prune_once(model, importance, ratio, input_size, min_channels, global_pruning, round_to, stage_ratios)
        if norm_batches is not None:
            recalibrate_batchnorm(model, norm_batches, str(next(model.parameters()).device))
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


def distillation_loss(
    teacher: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: float,
    temperature: float = 2.0, class_weights: torch.Tensor | None = None,
) -> Callable[[nn.Module, Any, int], torch.Tensor]:
    """A `fit(loss_forward=...)` loss: the task's (cost-sensitive) loss plus knowledge distillation from `teacher`,

        loss_fn(z_s, y) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    (Hinton et al. 2015). The unpruned net's soft outputs carry its class balance and its near-miss classes, which
    the few rare-class labels alone do not; the T^2 keeps the gradient scale independent of T. The teacher is frozen.

    The KL is averaged over the batch; with `class_weights` (one per class, e.g. the cost-sensitive loss's) it is
    the weighted mean sum_i w_{y_i} KL_i / sum_i w_{y_i}, the normalisation `nn.CrossEntropyLoss(weight=...)` uses,
    so the rare classes' images steer the distillation as much as they steer the task loss.
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


# --------------------------------------------------------------------------------------------------------------------
# Measuring a model
# --------------------------------------------------------------------------------------------------------------------


def latencies_ms(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, runs: int, warmup: int) -> np.ndarray:
    """Wall time (ms) of each of `runs` calls `forward(x)`, after `warmup` untimed calls (no autograd)."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            forward(x)
        for _ in range(runs):
            started = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - started)
    return 1000 * np.asarray(times)


def measure_speed(model: nn.Module, input_size: int, runs: int = 50, batch: int = 32, warmup: int = 5) -> dict:
    """CPU latency at batch 1 (p50 and p90 of `runs` runs, ms) and throughput at `batch` (images/s)."""
    model = model.eval()
    xb = torch.randn(batch, 3, input_size, input_size)
    times = latencies_ms(model, torch.randn(1, 3, input_size, input_size), runs, warmup)
    with torch.no_grad():
        model(xb)
        started = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            model(xb)
        throughput = repeats * batch / (time.perf_counter() - started)
    return {
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p90": float(np.percentile(times, 90)),
        "throughput_images_per_s": float(throughput),
        "torch_threads": torch.get_num_threads(),
    }


def weights_file_size(model: nn.Module) -> int:
    """Bytes of the model's weights as a safetensors file."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def measure_model(model: nn.Module, input_size: int, speed: bool = True, runs: int = 50) -> dict:
    """Parameters, FLOPs, weights file size and (optionally) CPU latency/throughput of `model`."""
    report = {
        "params": count_parameters(model),
        "flops": count_flops(model, input_size),
        "file_bytes": weights_file_size(model),
        "input_size": input_size,
    }
    if speed:
        report.update(measure_speed(model, input_size, runs=runs))
    return report


def predict_probs(model: nn.Module, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a loader of (images, labels) (the trainer's prediction loop)."""
    from pipelines.training import predict_probs as predict_with_speed

    probs, labels, _ = predict_with_speed(model, loader)
    return probs, labels


def accuracy_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], malignant_classes: list[str],
    minority_classes: list[str], operating_threshold: float | None = None, n_boot: int = 0, seed: int = 0,
) -> dict[str, Any]:
    """Balanced accuracy, malignant AUC, macro AUC and per-class / minority recalls; with `n_boot` > 0 also their
    95 % bootstrap intervals (`intervals`, from `pipelines.evaluation.bootstrap_intervals`)."""
    from pipelines.evaluation import bootstrap_intervals, compute_metrics

    metrics = compute_metrics(y_true, probs, class_names, malignant_classes, operating_threshold)
    recalls = {name: metrics["per_class"][name]["recall"] for name in class_names}
    report = {
        "balanced_accuracy": metrics["balanced_accuracy"],
        "malignant_auc": metrics.get("malignant_auc", float("nan")),
        "macro_auc": metrics["macro_auc"],
        "recall": recalls,
        "minority_recall": float(np.mean([recalls[c] for c in minority_classes])) if minority_classes else float("nan"),
        "n": metrics["n"],
    }
    if "at_operating_threshold" in metrics:
        report["at_operating_threshold"] = metrics["at_operating_threshold"]
    intervals = bootstrap_intervals(y_true, probs, class_names, malignant_classes, operating_threshold, n_boot, seed)
    if intervals is not None:
        report["intervals"] = intervals
    return report


def minority_classes_of(counts: list[int], class_names: list[str]) -> list[str]:
    """The rarer half of the classes (by training count): the ones pruning tends to forget first."""
    order = np.argsort(counts, kind="stable")
    return [class_names[i] for i in order[: max(1, len(class_names) // 2)]]


# --------------------------------------------------------------------------------------------------------------------
# Pruning a bundle: `lesionlab prune` and the `pruning` stage of `lesionlab run`
# --------------------------------------------------------------------------------------------------------------------


def parse_layer_ratios(items: Iterable[str]) -> dict[str, float]:
    """`NAME=RATIO` strings (e.g. `backbone.features.0=0.75`) as a conv name -> ratio dict for `prune_to_flops`."""
    ratios = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            ratios[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"layer ratio '{item}': expected CONV_NAME=FRACTION, e.g. backbone.features.0=0.75")
    return ratios


def _settings_model():
    from pydantic import BaseModel, ConfigDict, Field

    from pipelines.evaluation import BOOTSTRAP_RESAMPLES

    class PruningConfig(BaseModel):
        """The `pruning:` section of a run config (and the `lesionlab prune` flags)."""

        model_config = ConfigDict(extra="forbid")
        method: str = Field("beta-rank", pattern="^(" + "|".join(METHODS) + ")$")
        flops_reduction: float = Field(0.5, gt=0, lt=1)
        steps: int = Field(3, ge=1)
        global_pruning: bool = False
        max_layer_pruning: float = Field(0.9, gt=0, lt=1)
        calibration_per_class: int = Field(16, ge=1)
        batchnorm_images: int = Field(512, ge=1)
        round_to: int | None = Field(8, ge=1)
        layer_ratios: dict[str, float] = Field(default_factory=dict)
        distill_weight: float = Field(1.0, ge=0)
        distill_temperature: float = Field(2.0, gt=0)
        distill_class_weighted: bool = False
        fine_tune_epochs: int = Field(3, ge=0)
        fine_tune_lr: float = Field(5e-4, gt=0)
        batch_size: int = Field(32, ge=1)
        max_steps_per_epoch: int | None = Field(None, ge=1)
        eval_split: str = "test"
        target_sensitivity: float = Field(0.9, gt=0, le=1)
        speed_runs: int = Field(50, ge=1)
        bootstrap: int = Field(BOOTSTRAP_RESAMPLES, ge=0, description="resamples of the 95 % intervals; 0: none")
        seed: int = 0

    return PruningConfig


def load_pruning_config(raw: dict[str, Any] | None):
    """Validate a `pruning:` config section (unknown keys and out-of-range values are errors)."""
    from pipelines.config import stage_settings

    return stage_settings({"pruning": raw}, "pruning", _settings_model())


def balanced_calibration_rows(train: Any, per_class: int, seed: int = 0) -> Any:
    """Up to `per_class` training rows of every class (real images first), drawn with `seed`."""
    import pandas as pd

    if train.empty:
        raise ValueError("the manifest has no training rows to draw a calibration set from")
    rows = []
    for _, rows_of_class in train.groupby("label", sort=True):
        order = rows_of_class.sample(frac=1.0, random_state=seed)
        order = order.sort_values("source", kind="stable", key=lambda s: s != "real")
        rows.append(order.head(per_class))
    return pd.concat(rows)


def prune_bundle(bundle_dir: str | Path, manifest_path: str | Path, out_dir: str | Path, settings: Any) -> dict:
    """Prune a trained image bundle to a FLOPs target, fine-tune it, write the pruned bundle and a report."""
    from torch.utils.data import DataLoader

    from models.bundle import load_bundle, save_bundle
    from models.pruned import extract_channel_plan
    from pipelines.balancing import build_loss, class_weights
    from pipelines.calibration import calibrate_and_score, calibration_method_of
    from pipelines.config import TrainSettings
    from pipelines.data import ImageDataset
    from pipelines.evaluation import add_score_intervals, check_training_overlap, paired_bootstrap_delta, source_metrics
    from pipelines.manifest import manifest_sha256, read_manifest
    from pipelines.prediction import card_tta
    from pipelines.training import class_counts, fit
    from pipelines.transforms import card_transform, train_transform

    torch.manual_seed(settings.seed)
    bundle = load_bundle(bundle_dir)
    card = bundle.card
    if card.get("task", "image") != "image":
        raise ValueError(f"bundle '{bundle_dir}' is a {card.get('task')} model; pruning supports image classifiers")
    model, class_names, size = bundle.model, bundle.class_names, bundle.input_size
    malignant, norm = bundle.malignant_classes, card["normalization"]
    manifest = read_manifest(manifest_path)
    train_df = manifest[manifest.split == "train"]
    val_df = manifest[(manifest.split == "val") & (manifest.source == "real")]
    eval_df = manifest[(manifest.split == settings.eval_split) & (manifest.source == "real")]
    if val_df.empty:
        raise ValueError(f"manifest '{manifest_path}' has no real 'val' rows (needed to fine-tune and set thresholds)")
    if eval_df.empty:
        log.warning("manifest has no '%s' rows; reporting on the validation split", settings.eval_split)
        eval_df = val_df
    evaluate = card_transform(card)
    constancy = evaluate.color_constancy
    calib_rows = balanced_calibration_rows(train_df, settings.calibration_per_class, settings.seed)
    calibration = [x for x, _ in DataLoader(ImageDataset(calib_rows, class_names, evaluate), batch_size=32)]
    norm_rows = train_df.sample(n=min(settings.batchnorm_images, len(train_df)), random_state=settings.seed)
    batchnorm = [x for x, _ in DataLoader(ImageDataset(norm_rows, class_names, evaluate), batch_size=64)]
    eval_ds = ImageDataset(eval_df, class_names, evaluate, cache_images=True)
    counts = class_counts(train_df.label, class_names)
    minority = minority_classes_of(counts, class_names)
    scored = manifest[manifest.split.isin(["val", settings.eval_split]) & (manifest.source == "real")]
    overlap = check_training_overlap(bundle_dir, card, scored, "validation and evaluation", [manifest_path])

    # Before and after are scored as each bundle serves: its own test-time augmentation and calibration, so the
    # "before" column is what evaluating the source bundle gives and the "after" column what the card says.
    before_labels, before_probs = served_probs(model, eval_ds, card.get("calibration"), card_tta(card))
    before = {**measure_model(model, size, runs=settings.speed_runs),
              "accuracy": accuracy_report(before_labels, before_probs, class_names, malignant, minority,
                                          card.get("operating_threshold"), settings.bootstrap)}
    out_dir = Path(out_dir)
    training = card.get("training", {})
    weighting = training.get("class_weighting", "effective")
    loss_fn = build_loss(training.get("loss", "ce") if training.get("loss") in ("ce", "focal") else "ce",
                         counts, weighting)

    def fine_tune(pruned: nn.Module, stage: int) -> nn.Module:
        if settings.fine_tune_epochs == 0 or train_df.empty:
            return pruned
        train_settings = TrainSettings(
            epochs=settings.fine_tune_epochs, batch_size=settings.batch_size, lr=settings.fine_tune_lr,
            warmup_epochs=0, patience=settings.fine_tune_epochs, max_steps_per_epoch=settings.max_steps_per_epoch,
            device="cpu", seed=settings.seed, resume=False, class_weighting=weighting, ema_decay=0.0,
        )
        train_ds = ImageDataset(train_df, class_names, train_transform(size, norm["mean"], norm["std"], constancy))
        generator = torch.Generator().manual_seed(settings.seed + stage)
        train_loader = DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, generator=generator,
                                  drop_last=len(train_ds) > settings.batch_size)
        val_loader = DataLoader(ImageDataset(val_df, class_names, evaluate), batch_size=64)
        run = out_dir / "finetune" / f"stage{stage}"
        return fit(pruned, train_loader, val_loader, loss_fn, train_settings, run, loss_forward=distill).model

    distill = None  # the unpruned net teaches every stage's fine-tune
    if settings.distill_weight > 0 and settings.fine_tune_epochs > 0:
        kd_weights = class_weights(counts, weighting) if settings.distill_class_weighted else None
        distill = distillation_loss(copy.deepcopy(model), loss_fn, settings.distill_weight,
                                    settings.distill_temperature, class_weights=kd_weights)

    result = prune_to_flops(model, settings.method, settings.flops_reduction, size, calibration=calibration,
                            steps=settings.steps, global_pruning=settings.global_pruning,
                            max_layer_pruning=settings.max_layer_pruning, fine_tune=fine_tune, seed=settings.seed,
                            batchnorm_batches=batchnorm, round_to=settings.round_to,
                            layer_ratios=settings.layer_ratios)
    model = result.model.cpu().eval()

    new_card = json_copy(card)
    new_card["architecture"]["channel_plan"] = extract_channel_plan(model)
    # The pruned net is a new model: re-fit its calibration and referral threshold on validation, with the
    # bundle's own test-time augmentation, and let its card show its own numbers.
    scores = calibrate_and_score(
        model, ImageDataset(val_df, class_names, evaluate),
        ImageDataset(eval_df, class_names, evaluate) if settings.eval_split == "test" and eval_df is not val_df
        else None,
        class_names, malignant, card_tta(card), calibration_method_of(card), settings.target_sensitivity,
    )
    add_score_intervals(scores, class_names, malignant, settings.bootstrap)
    threshold = scores.threshold
    op = threshold["threshold"] if threshold else None
    if scores.test_metrics is not None:
        after_labels, after_probs = scores.test_labels, scores.test_probs
    elif eval_df is val_df or settings.eval_split == "val":
        after_labels, after_probs = scores.val_labels, scores.val_probs
    else:
        after_labels, after_probs = served_probs(model, eval_ds, scores.calibration, scores.tta)
    after = {**measure_model(model, size, runs=settings.speed_runs),
             "accuracy": accuracy_report(after_labels, after_probs, class_names, malignant, minority, op,
                                         settings.bootstrap)}
    y_malignant = np.isin(np.asarray(class_names)[after_labels], malignant)
    delta = None
    if settings.bootstrap and np.array_equal(before_labels, after_labels) and 0 < y_malignant.sum() < len(y_malignant):
        delta = paired_bootstrap_delta(after_labels, before_probs, after_probs, class_names, malignant,
                                       settings.bootstrap)
    new_card["operating_threshold"] = op
    new_card["threshold_metrics"] = threshold
    new_card["calibration"] = scores.calibration
    new_card["inference"] = {"tta": scores.tta}
    # The card's metrics are the pruned net's own; the source bundle's go apart, with its hash.
    new_card["metrics"] = scores.card_metrics()
    new_card["source_metrics"] = source_metrics(bundle_dir, card)
    new_card["manifest_sha256"] = manifest_sha256(manifest_path)  # fine-tuned on this manifest's training rows
    report = {
        "settings": settings.model_dump(), "source_bundle": str(bundle_dir),
        "source_bundle_sha256": new_card["source_metrics"]["bundle_sha256"], "manifest": str(manifest_path),
        "calibration_counts": calib_rows.label.value_counts().sort_index().to_dict(),
        "minority_classes": minority, "eval_split": settings.eval_split, "stages": result.stages,
        "before": before, "after": after, "delta": delta, "training_overlap": overlap,
        "flops_reduction": result.flops_reduction, "speedup_p50": before["latency_ms_p50"] / after["latency_ms_p50"],
    }
    new_card["pruning"] = {k: report[k] for k in ("flops_reduction", "stages", "speedup_p50")} | {
        "method": settings.method, "base_flops": result.base_flops, "flops": result.flops}
    save_bundle(out_dir, model, new_card)
    write_pruning_report(report, out_dir)
    return report


def served_probs(model: nn.Module, dataset: Any, calibration: dict[str, Any] | None, tta: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of `model` on `dataset` as a bundle serves them: its test-time augmentation views,
    each calibrated, averaged (the predictor's recipe)."""
    from pipelines.calibration import calibrated_probs
    from pipelines.prediction import dataset_logits

    # On a copy: scoring runs in inference mode, and its layout changes would leave `model`'s parameters as
    # inference tensors that the fine-tuning after it cannot train.
    logits, labels = dataset_logits(copy.deepcopy(model), dataset, tta)
    return labels, calibrated_probs(logits, calibration)


def json_copy(value: Any) -> Any:
    """A deep copy through JSON (cards are JSON)."""
    import json

    return json.loads(json.dumps(value, default=float))


def write_pruning_report(report: dict, out_dir: Path) -> Path:
    """`pruning_report.json` and a short `pruning_report.md` table (before / after)."""
    import json

    from pipelines.evaluation import interval_text, training_overlap_lines

    def ci(side: dict) -> dict:
        return side["accuracy"].get("intervals") or {}

    (out_dir / "pruning_report.json").write_text(json.dumps(report, indent=2, default=float))
    b, a = report["before"], report["after"]
    rows = [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}"),
        ("FLOPs (batch 1)", f"{b['flops'] / 1e6:.1f} M", f"{a['flops'] / 1e6:.1f} M"),
        ("weights file", f"{b['file_bytes'] / 1024:.0f} KB", f"{a['file_bytes'] / 1024:.0f} KB"),
        ("CPU latency p50 (batch 1)", f"{b['latency_ms_p50']:.1f} ms", f"{a['latency_ms_p50']:.1f} ms"),
        ("CPU throughput (batch 32)", f"{b['throughput_images_per_s']:.0f} img/s",
         f"{a['throughput_images_per_s']:.0f} img/s"),
        ("balanced accuracy", *(f"{x['accuracy']['balanced_accuracy']:.3f}"
                                f"{interval_text(ci(x).get('balanced_accuracy'))}" for x in (b, a))),
        ("malignant AUC", *(f"{x['accuracy']['malignant_auc']:.3f}{interval_text(ci(x).get('malignant_auc'))}"
                            for x in (b, a))),
        ("minority recall (" + ", ".join(report["minority_classes"]) + ")",
         f"{b['accuracy']['minority_recall']:.3f}", f"{a['accuracy']['minority_recall']:.3f}"),
    ]
    rows += [(f"recall {c}", *(f"{x['accuracy']['recall'][c]:.3f}{interval_text(ci(x).get('recall', {}).get(c))}"
                               for x in (b, a))) for c in b["accuracy"]["recall"]]
    lines = [f"# Pruning report ({report['settings']['method']}, {report['flops_reduction']:.1%} fewer FLOPs)", "",
             *training_overlap_lines(report.get("training_overlap")),
             f"Evaluated on the `{report['eval_split']}` split ({b['accuracy']['n']} images), each bundle with its "
             "own calibration and test-time augmentation.", "",
             "| | before | after |", "|---|---|---|", *[f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]]
    intervals = ci(a) or ci(b)
    if intervals:
        lines += ["", f"[low, high]: {100 * intervals['confidence']:.0f} % {intervals['method']} "
                  f"({intervals['n_boot']} resamples, seed {intervals['seed']})."]
    if report.get("delta"):
        d = report["delta"]
        lines += ["", "Change after - before, 95 % paired bootstrap on the same images: balanced accuracy "
                  f"{d['balanced_accuracy']['delta']:+.3f} [{d['balanced_accuracy']['low']:+.3f}, "
                  f"{d['balanced_accuracy']['high']:+.3f}], malignant AUC {d['malignant_auc']['delta']:+.3f} "
                  f"[{d['malignant_auc']['low']:+.3f}, {d['malignant_auc']['high']:+.3f}]."]
    path = out_dir / "pruning_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_pruning_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> dict[str, Any]:
    """`lesionlab run` stage: prune run_dir/bundle into run_dir/bundle_pruned."""
    settings = load_pruning_config(config.pruning)
    run_dir = Path(run_dir)
    bundle = run_dir / "bundle"
    if not (bundle / "card.json").is_file():
        raise FileNotFoundError(f"pruning needs the trained bundle '{bundle}'; the train stage did not write one")
    out = run_dir / "bundle_pruned"
    prune_bundle(bundle, Path(manifest_path or run_dir / "manifest.csv"), out, settings)
    return {"bundle": str(out), "report": str(out / "pruning_report.md")}


def _cmd_prune(args: Any) -> None:
    from pydantic import ValidationError

    from pipelines.cli import CliError

    fields = {"method": args.method, "flops_reduction": args.flops_reduction, "steps": args.steps,
              "global_pruning": args.global_pruning, "max_layer_pruning": args.max_layer_pruning,
              "calibration_per_class": args.calibration_per_class, "batchnorm_images": args.batchnorm_images,
              "round_to": args.round_to, "distill_weight": args.distill_weight,
              "distill_temperature": args.distill_temperature,
              "distill_class_weighted": args.distill_class_weighted, "fine_tune_epochs": args.epochs,
              "fine_tune_lr": args.lr, "batch_size": args.batch_size, "max_steps_per_epoch": args.max_steps_per_epoch,
              "eval_split": args.eval_split, "seed": args.seed, "speed_runs": args.speed_runs,
              "bootstrap": args.bootstrap}
    try:
        fields["layer_ratios"] = parse_layer_ratios(args.layer_ratio) if args.layer_ratio else None
        settings = load_pruning_config({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise CliError(f"prune: {'.'.join(map(str, first['loc']))}: {first['msg']}") from err
    except ValueError as err:  # a malformed --layer-ratio
        raise CliError(f"prune: {err}") from err
    if not (Path(args.bundle) / "card.json").is_file():
        raise CliError(f"prune: '{args.bundle}' is not a model bundle (no card.json)")
    if not Path(args.data).is_file():
        raise CliError(f"prune: manifest '{args.data}' does not exist")
    report = prune_bundle(args.bundle, args.data, args.out, settings)
    b, a = report["before"], report["after"]
    print(f"pruned bundle: {args.out}  report: {Path(args.out) / 'pruning_report.md'}")
    print(f"FLOPs {b['flops'] / 1e6:.1f} M -> {a['flops'] / 1e6:.1f} M ({report['flops_reduction']:.1%} fewer), "
          f"params {b['params']:,} -> {a['params']:,}, p50 latency x{report['speedup_p50']:.2f} faster, "
          f"balanced accuracy {b['accuracy']['balanced_accuracy']:.3f} -> {a['accuracy']['balanced_accuracy']:.3f}, "
          f"malignant AUC {b['accuracy']['malignant_auc']:.3f} -> {a['accuracy']['malignant_auc']:.3f}")


def add_cli(subparsers: Any) -> None:
    """Register `lesionlab prune`."""
    p = subparsers.add_parser("prune", help="Beta-Rank (or L1 / HRank / random) structural pruning of a bundle")
    p.add_argument("--bundle", required=True, help="trained image-classifier bundle")
    p.add_argument("--data", required=True, help="the manifest it was trained on (train: fine-tuning + calibration)")
    p.add_argument("--out", required=True, help="folder for the pruned bundle and pruning_report.md")
    p.add_argument("--method", choices=METHODS, help="filter importance (default beta-rank)")
    p.add_argument("--flops-reduction", type=float, help="fraction of FLOPs to remove (default 0.5)")
    p.add_argument("--steps", type=int, help="iterative prune -> fine-tune stages (default 3)")
    p.add_argument("--global", dest="global_pruning", action="store_const", const=True,
                   help="rank filters across layers instead of the same ratio per layer")
    p.add_argument("--max-layer-pruning", type=float, help="most of one layer's filters ever removed (default 0.9)")
    p.add_argument("--calibration-per-class", type=int, help="calibration images per class (default 16)")
    p.add_argument("--batchnorm-images", type=int,
                   help="random training images BatchNorm statistics are re-estimated on after each step (default 512)")
    p.add_argument("--round-to", type=int,
                   help="keep a multiple of this many channels in every pruned layer (default 8; 1: no rounding)")
    p.add_argument("--distill-weight", type=float,
                   help="weight of distillation from the unpruned net during fine-tuning (default 1; 0: off)")
    p.add_argument("--distill-temperature", type=float, help="distillation temperature (default 2)")
    p.add_argument("--distill-class-weighted", action=argparse.BooleanOptionalAction,
                   help="weight each image's distillation term by its class's loss weight (default off)")
    p.add_argument("--layer-ratio", nargs="+", metavar="CONV=FRACTION",
                   help="fix the fraction of a conv's filters removed (e.g. backbone.features.0=0.75); the FLOPs "
                        "search prunes the other layers")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs after each stage (default 3; 0: none)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--eval-split", help="split the before/after report uses (default test)")
    p.add_argument("--speed-runs", type=int, help="latency runs (default 50)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples of the report's 95 %% intervals (default 1000; "
                   "0: none)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_prune)
