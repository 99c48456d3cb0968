"""Channel plans: the JSON description of a structurally pruned network, and rebuilding a net from one.

A plan lists, for every convolution, batch norm and linear layer, the channel counts it has after pruning
(`{"format": 1, "modules": {"backbone.net._conv_stem": {"type": "conv", "in_channels": 3, ...}}}`).
`apply_channel_plan` resizes the layers of a freshly built, unpruned network to those counts (with
uninitialised weights), so that the pruned bundle's safetensors load into it strictly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

PLAN_FORMAT = 1


def extract_channel_plan(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable channel plan of `model` (every conv, batch-norm and linear layer's widths)."""
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            modules[name] = {
                "type": "conv",
                "in_channels": int(module.in_channels),
                "out_channels": int(module.out_channels),
                "groups": int(module.groups),
            }
        elif isinstance(module, _BatchNorm):
            modules[name] = {"type": "batchnorm", "num_features": int(module.num_features)}
        elif isinstance(module, nn.Linear):
            modules[name] = {
                "type": "linear",
                "in_features": int(module.in_features),
                "out_features": int(module.out_features),
            }
    return {"format": PLAN_FORMAT, "modules": modules}


def _empty_like_shape(param: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if param is None:
        return None
    return torch.zeros(shape, dtype=param.dtype, device=param.device)


def _resize_conv(module: _ConvNd, name: str, spec: dict[str, Any]) -> None:
    in_ch, out_ch, groups = int(spec["in_channels"]), int(spec["out_channels"]), int(spec["groups"])
    if min(in_ch, out_ch, groups) < 1 or in_ch % groups or out_ch % groups:
        raise ValueError(
            f"channel plan for conv '{name}' is invalid: in={in_ch}, out={out_ch}, groups={groups}; "
            "expected positive counts that the groups divide"
        )
    if module.transposed:
        raise ValueError(f"channel plan for '{name}': transposed convolutions are not supported")
    module.in_channels, module.out_channels, module.groups = in_ch, out_ch, groups
    module.weight = nn.Parameter(_empty_like_shape(module.weight, (out_ch, in_ch // groups, *module.kernel_size)))
    if module.bias is not None:
        module.bias = nn.Parameter(_empty_like_shape(module.bias, (out_ch,)))


def _resize_batchnorm(module: _BatchNorm, name: str, spec: dict[str, Any]) -> None:
    n = int(spec["num_features"])
    if n < 1:
        raise ValueError(f"channel plan for batch norm '{name}' has {n} features; at least 1 is required")
    module.num_features = n
    if module.affine:
        module.weight = nn.Parameter(torch.ones(n, dtype=module.weight.dtype))
        module.bias = nn.Parameter(torch.zeros(n, dtype=module.bias.dtype))
    if module.track_running_stats:
        module.running_mean = torch.zeros(n, dtype=module.running_mean.dtype)
        module.running_var = torch.ones(n, dtype=module.running_var.dtype)


def _resize_linear(module: nn.Linear, name: str, spec: dict[str, Any]) -> None:
    n_in, n_out = int(spec["in_features"]), int(spec["out_features"])
    if n_out != module.out_features:
        raise ValueError(
            f"channel plan changes the outputs of linear '{name}' ({module.out_features} -> {n_out}); "
            "a plan may only change input widths of linear layers (the classes are fixed)"
        )
    if n_in < 1:
        raise ValueError(f"channel plan for linear '{name}' has {n_in} inputs; at least 1 is required")
    module.in_features = n_in
    module.weight = nn.Parameter(_empty_like_shape(module.weight, (n_out, n_in)))


def apply_channel_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Resize `model`'s layers in place to the widths in `plan` (as written by `extract_channel_plan`)."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("modules"), dict):
        raise ValueError(f"not a channel plan: expected {{'format': {PLAN_FORMAT}, 'modules': {{...}}}}")
    named = dict(model.named_modules())
    for name, spec in plan["modules"].items():
        module = named.get(name)
        if module is None:
            raise ValueError(f"channel plan names layer '{name}', which this {type(model).__name__} does not have")
        kind = spec.get("type")
        if kind == "conv" and isinstance(module, _ConvNd):
            _resize_conv(module, name, spec)
        elif kind == "batchnorm" and isinstance(module, _BatchNorm):
            _resize_batchnorm(module, name, spec)
        elif kind == "linear" and isinstance(module, nn.Linear):
            _resize_linear(module, name, spec)
        else:
            raise ValueError(f"channel plan says '{name}' is a {kind!r} layer, but it is a {type(module).__name__}")
    sync_widths(model)
    return model


def sync_widths(model: nn.Module) -> None:
    """Update bookkeeping attributes (`embed_dim`, backbone `out_channels`) after the head's input width changed."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        if hasattr(model, "embed_dim"):
            model.embed_dim = head.in_features
        backbone = getattr(model, "backbone", None)
        if backbone is not None and hasattr(backbone, "out_channels"):
            backbone.out_channels = head.in_features
