"""Filter importances for structural pruning, as Torch-Pruning `Importance` objects: Beta-Rank, HRank, L1, random.

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
gets beta = 0.

Every importance here scores each convolution's filters once per pruning stage (`calibrate`, on the real model),
divides them by the layer's largest score, and scores a Torch-Pruning group (layers whose channels must be removed
together) by the mean of its convolutions' normalised scores. The scores are looked up by layer name, so the same
object also scores the weightless meta-device copies the FLOPs search prunes. L1 and random use Torch-Pruning's
own `MagnitudeImportance(p=1)` and `RandomImportance` for the per-filter scores.

`torch_pruning` is imported at module level (the classes subclass its `Importance`); only the pruning stage
imports this package, so `lesionlab --help` stays quick.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from pipelines.config import PRUNING_METHODS

__all__ = [
    "DATA_METHODS",
    "METHODS",
    "BetaRankImportance",
    "HRankImportance",
    "L1Importance",
    "LayerwiseImportance",
    "SeededRandomImportance",
    "beta_from_sigmas",
    "beta_rank_scores",
    "build_importance",
    "conv_layers",
    "filter_group",
    "hrank_scores",
    "normalize_per_layer",
]

log = logging.getLogger(__name__)

METHODS = PRUNING_METHODS
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
    """HRank: the mean rank of each filter's output feature map over the calibration images, by layer name."""
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


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each layer's scores by the layer's largest (all-zero layers stay zero)."""
    out = {}
    for name, s in scores.items():
        top = s.max() if s.numel() else torch.tensor(0.0)
        out[name] = s / top if top > 0 else torch.zeros_like(s)
    return out


def filter_group(conv: nn.Conv2d, name: str) -> Any:
    """A Torch-Pruning group of one dependency: every output filter of `conv` alone, no coupled layers (so that a
    Torch-Pruning importance scores exactly that layer's filters)."""
    from torch_pruning.dependency import Dependency, Group, Node
    from torch_pruning.pruner import function

    node = Node(conv, None, name)
    prune_out = function.prune_conv_out_channels
    idxs = list(range(conv.out_channels))
    group = Group()
    group.add_dep(Dependency(prune_out, prune_out, source=node, target=node), idxs)
    group[0].root_idxs = idxs
    return group


# --------------------------------------------------------------------------------------------------------------------
# The importances
# --------------------------------------------------------------------------------------------------------------------


class LayerwiseImportance(tp.importance.Importance):
    """Base of the importances here: per-filter scores of each conv (`layer_scores`), normalised per layer, and a
    group's score the mean over the convolutions whose output channels it couples.

    `calibrate(model, batches)` before each pruning step; `bind(copy)` to score a copy of the calibrated model."""

    needs_data = False

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.scores: dict[str, torch.Tensor] = {}
        self._names: dict[nn.Module, str] = {}

    def layer_scores(self, model: nn.Module, batches: Iterable[Any] | None) -> dict[str, torch.Tensor]:
        """Un-normalised score of every filter of every conv of `model`, by layer name."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, batches: Iterable[Any] | None = None) -> "LayerwiseImportance":
        """Score every conv's filters on the current `model` (and calibration `batches` if the criterion needs)."""
        if self.needs_data and batches is None:
            raise ValueError(f"{type(self).__name__} needs calibration images; none were given")
        self.scores = normalize_per_layer(self.layer_scores(model, batches))
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


class BetaRankImportance(LayerwiseImportance):
    """Beta-Rank: ||W_k||_1 times the mean ratio of input to output spread over a calibration set (module docstring).

    Args:
        inverse: use sigma_out / sigma_in (the authors' public code) instead of the paper's sigma_in / sigma_out.
        device: where the calibration images are run.

    References:
        Homayounfar, Koohi-Moghadam, Rawassizadeh, Vardhanabhuti, "Beta-Rank: A Robust Convolutional Filter Pruning
        Method For Imbalanced Medical Image Analysis", arXiv 2304.07461 (2023).
    """

    needs_data = True

    def __init__(self, inverse: bool = False, device: str = "cpu") -> None:
        super().__init__(device)
        self.inverse = inverse

    def layer_scores(self, model: nn.Module, batches: Iterable[Any] | None) -> dict[str, torch.Tensor]:
        return beta_rank_scores(model, batches, inverse=self.inverse, device=self.device)


class HRankImportance(LayerwiseImportance):
    """HRank: the mean rank of each filter's output feature map over a calibration set.

    References:
        Lin, Ji, Wang, Zhang, Zhang, Tian, Shao, "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020.
    """

    needs_data = True

    def layer_scores(self, model: nn.Module, batches: Iterable[Any] | None) -> dict[str, torch.Tensor]:
        return hrank_scores(model, batches, device=self.device)


class L1Importance(LayerwiseImportance):
    """The L1 norm of each filter's weights, from Torch-Pruning's `MagnitudeImportance(p=1)` on each conv alone.

    References:
        Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017.
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.magnitude = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)

    def layer_scores(self, model: nn.Module, batches: Iterable[Any] | None = None) -> dict[str, torch.Tensor]:
        return {name: self.magnitude(filter_group(conv, name)).float().cpu()
                for name, conv in conv_layers(model).items()}


class SeededRandomImportance(LayerwiseImportance):
    """Uniform random filter scores from Torch-Pruning's `RandomImportance`, drawn under `seed` (the same draws on
    every call, and the global random state left as it was): the baseline every criterion must beat."""

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(device)
        self.seed = seed
        self.random = tp.importance.RandomImportance()

    def layer_scores(self, model: nn.Module, batches: Iterable[Any] | None = None) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return {name: self.random(filter_group(conv, name)) for name, conv in conv_layers(model).items()}


def build_importance(method: str, seed: int = 0, device: str = "cpu") -> LayerwiseImportance:
    """The importance object of a pruning method name (one of METHODS)."""
    if method == "beta-rank":
        return BetaRankImportance(inverse=False, device=device)
    if method == "beta-rank-inverse":
        return BetaRankImportance(inverse=True, device=device)
    if method == "hrank":
        return HRankImportance(device=device)
    if method == "l1":
        return L1Importance(device=device)
    if method == "random":
        return SeededRandomImportance(seed=seed, device=device)
    raise ValueError(f"unknown pruning method '{method}'; expected one of {list(METHODS)}")
