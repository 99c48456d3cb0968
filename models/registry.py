"""`build_model(name, ...)`: every classifier lesionlab trains, by name."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.classifier import ImageClassifier, SmallCNN
from models.efficientnet import (
    LITE_NORMALIZATION,
    LITE_SPECS,
    EfficientNetBackbone,
    build_efficientnet_bn,
    build_efficientnet_lite,
    init_b0_from_lite0,
    load_lite_imagenet,
)

log = logging.getLogger(__name__)

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HALF_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _efficientnet_lite(name: str):
    def build(num_classes: int, img_size: int, pretrained: bool = False, dropout: float = 0.2, **_: Any) -> nn.Module:
        net = build_efficientnet_lite(name, num_classes=1000, image_size=img_size)
        if pretrained:
            load_lite_imagenet(net, name)
        backbone = EfficientNetBackbone(net)
        return ImageClassifier(backbone, backbone.out_channels, num_classes, dropout)

    return build


def _efficientnet_bn(name: str):
    def build(num_classes: int, img_size: int, pretrained: bool = False, dropout: float = 0.2, **_: Any) -> nn.Module:
        net = build_efficientnet_bn(name, img_size)
        if pretrained:
            if name != "efficientnet-b0":
                raise ValueError(f"no ImageNet weights for {name} are available offline; set `pretrained: false` "
                                 "or give a local checkpoint, or use efficientnet-b0 / efficientnet-lite0..2")
            log.info("efficientnet-b0: warm-starting from ImageNet EfficientNet-Lite0 weights (SE gates neutral)")
            init_b0_from_lite0(net)
        backbone = EfficientNetBackbone(net)
        return ImageClassifier(backbone, backbone.out_channels, num_classes, dropout)

    return build


def _vit(
    num_classes: int,
    img_size: int,
    dropout: float | None = None,
    pretrained_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """MONAI's ViT: random (6 layers, width 192, mean-pooled) or, with `pretrained_path`, the architecture and
    backbone weights of a local ImageNet-pretrained ViT (transformers or timm layout) with a new head."""
    from models.vit import VIT_DEFAULTS, build_vit

    given = {k: v for k, v in kwargs.items() if k in VIT_DEFAULTS}
    if pretrained_path is None:
        dropout = 0.1 if dropout is None else dropout
        return build_vit(num_classes, img_size, **{**VIT_DEFAULTS, **given}, dropout=dropout)
    from models.vit_weights import load_pretrained_vit, read_pretrained_vit

    weights = read_pretrained_vit(pretrained_path, given.get("num_heads"), given.get("layer_norm_eps"))
    architecture = {**weights.architecture, "pool": "cls"}
    conflicts = [f"{k}={v} (the weights have {architecture[k]})" for k, v in given.items() if architecture[k] != v]
    if conflicts:
        raise ValueError(f"model.kwargs {', '.join(conflicts)} contradict the pretrained ViT '{pretrained_path}'; "
                         "leave them out: a pretrained ViT's architecture comes from its weights")
    dropout = weights.dropout if dropout is None else dropout
    model = build_vit(num_classes, img_size, **architecture, dropout=dropout)
    load_pretrained_vit(model.backbone.vit, weights, img_size)
    if weights.normalization and weights.normalization != HALF_NORMALIZATION:
        log.warning("the ViT weights were trained on inputs normalised with mean %s / std %s; lesionlab feeds a ViT "
                    "mean %s / std %s, which fine-tuning has to adapt to", weights.normalization["mean"],
                    weights.normalization["std"], HALF_NORMALIZATION["mean"], HALF_NORMALIZATION["std"])
    # What a bundle card must record to rebuild this network without the pretrained file.
    model.architecture_kwargs = {**architecture, "dropout": dropout}
    return model


def _small_cnn(num_classes: int, img_size: int, widths: tuple[int, ...] = (32, 64, 128, 256), **_: Any) -> nn.Module:
    backbone = SmallCNN(3, tuple(widths))
    return ImageClassifier(backbone, backbone.out_channels, num_classes, 0.2)


# name -> builder; a "module:function" string is imported on first use (for networks that live in their own file).
_BUILDERS: dict[str, Callable[..., nn.Module] | str] = {
    "vit": _vit,
    "small-cnn": _small_cnn,
    **{name: _efficientnet_lite(name) for name in LITE_SPECS},
    **{f"efficientnet-b{i}": _efficientnet_bn(f"efficientnet-b{i}") for i in range(8)},
    "scmil": "models.scmil:build_scmil",
}

# Architectures `pretrained=True` gives ImageNet-derived weights (B0: warm start from Lite0), and those with no
# pretrained weights at all (EfficientNet-B1..B7 refuse `pretrained=True` themselves).
PRETRAINED_WEIGHTS = frozenset({*LITE_SPECS, "efficientnet-b0"})
NO_PRETRAINED_WEIGHTS = frozenset({"vit", "small-cnn"})

# Input normalisation each architecture was (pre)trained with; the bundle stores it for serving.
NORMALIZATION = {name: LITE_NORMALIZATION for name in LITE_SPECS}


def available_models() -> list[str]:
    """Names `build_model` accepts."""
    return sorted(_BUILDERS)


def default_normalization(name: str) -> dict[str, list[float]]:
    """Mean/std a model of this architecture expects (EfficientNet-Lite: 0.498/0.502; others: 0.5/0.5)."""
    return NORMALIZATION.get(name, HALF_NORMALIZATION)


def build_model(
    name: str,
    num_classes: int,
    img_size: int = 224,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name; `checkpoint` is a local state dict (safetensors or .pt) to initialise from.

    For "vit", `pretrained_path=` (a transformers ViT folder or file, or a timm ViT state dict) gives the
    architecture and ImageNet backbone weights of that ViT; the head stays new.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; expected one of {available_models()}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module_name, function = builder.split(":")
        builder = getattr(importlib.import_module(module_name), function)
    if kwargs.get("pretrained") and name in NO_PRETRAINED_WEIGHTS and checkpoint is None:
        if name == "vit" and kwargs.get("pretrained_path") is None:
            log.warning("vit: no pretrained weights ship with lesionlab; it starts from a random initialisation "
                        "(set model.pretrained_path to local ImageNet ViT weights, transformers or timm layout)")
        elif name != "vit":
            log.warning("%s has no pretrained weights; it starts from a random initialisation (give a local "
                        "checkpoint to start from your own weights)", name)
    if kwargs.get("pretrained_path") is not None and name != "vit":
        raise ValueError(f"pretrained_path loads ViT weights; model '{name}' cannot take them (use `checkpoint`)")
    model = builder(num_classes=num_classes, img_size=img_size, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, Path(checkpoint))
    return model


def architecture_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder arguments a bundle card records to rebuild `model` without its initial weights: for a ViT
    loaded from pretrained weights, the architecture read from them; otherwise the configured `kwargs`."""
    built = getattr(model, "architecture_kwargs", None)
    if built is not None:
        return dict(built)
    return {k: v for k, v in kwargs.items() if k != "pretrained_path"}


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Initialise `model` from a local file; a head whose shape differs (other class count) is left as built."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"checkpoint '{path}' shares no weights with this model (keys or shapes differ)")
    model.load_state_dict(usable, strict=False)
