"""ImageNet-pretrained ViT weights a user has on disk, loaded into lesionlab's ViT (models/vit.py).

Two layouts are read: a Hugging Face `transformers` ViT (ViTModel or ViTForImageClassification, a folder with
`config.json` and `model.safetensors` or `pytorch_model.bin`, or one of those files) and a timm `vit_*` state dict
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `blocks.N.mlp.fc1/fc2`, `norm`, `head`). Both
are first brought to the timm layout, checked key by key and shape by shape, then renamed to MONAI's ViT. Only the
backbone is loaded: the classification head (and transformers' pooler) is left out, since ours predicts our classes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# transformers ViT names (v4 files and the hub; v5 in-memory names) -> timm names; q/k/v are merged afterwards.
_TRANSFORMERS_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.attention\.q_proj\.(weight|bias)", r"blocks.\1.attn.query.\2"),
    (r"layers\.(\d+)\.attention\.k_proj\.(weight|bias)", r"blocks.\1.attn.key.\2"),
    (r"layers\.(\d+)\.attention\.v_proj\.(weight|bias)", r"blocks.\1.attn.value.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_TRANSFORMERS_RENAMES = [(re.compile(pattern), target) for pattern, target in _TRANSFORMERS_RENAMES]
_TRANSFORMERS_LEFT_OUT = re.compile(r"classifier\..*|pooler\..*|embeddings\.mask_token")
_TIMM_KEY = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)
_TIMM_LEFT_OUT = re.compile(r"head\.(weight|bias)")
# Attention heads of the standard widths (ViT-Ti/S/B/L/H/g/G), for files that do not say.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
# Layer-norm epsilon of each layout when a file does not say (transformers' ViTConfig default; timm's ViT).
_LAYER_NORM_EPS = {"transformers": 1e-12, "timm": 1e-6}


@dataclass
class PretrainedViT:
    """A pretrained ViT backbone read from disk: its architecture and its weights in the timm layout."""

    source: Path
    layout: str  # "transformers" or "timm"
    architecture: dict[str, Any]  # patch_size, hidden_size, mlp_dim, num_layers, num_heads, qkv_bias, layer_norm_eps
    image_size: int  # the input size (px) its position embeddings were trained for
    state: dict[str, torch.Tensor]
    dropout: float = 0.0
    normalization: dict[str, list[float]] | None = None
    left_out: list[str] = field(default_factory=list)  # head / pooler keys that are not loaded

    def describe(self) -> str:
        a = self.architecture
        return (f"{self.layout} layout: {a['num_layers']} layers, width {a['hidden_size']}, {a['num_heads']} heads, "
                f"patch {a['patch_size']}, trained at {self.image_size} px")


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"ViT weights '{path}' are not a state dict of tensors")
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def _locate(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The weights file and the config.json beside it (if any) for a folder or a file."""
    if path.is_dir():
        files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"ViT weights folder '{path}' holds neither {' nor '.join(WEIGHT_FILES)}")
        weights, folder = files[0], path
    elif path.is_file():
        weights, folder = path, path.parent
    else:
        raise FileNotFoundError(f"ViT weights '{path}' do not exist")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return weights, config if isinstance(config, dict) else None


def _square(value: Any, what: str, source: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"ViT weights '{source}': {what} {list(value)} is not square; only square inputs load")
        value = value[0]
    return int(value)


def transformers_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """A transformers ViT state dict in timm names (q/k/v merged into qkv).

    Returns (state, keys left out on purpose: head and pooler, keys of no ViT backbone).
    """
    renamed: dict[str, torch.Tensor] = {}
    left_out, unknown = [], []
    for key, tensor in state.items():
        name = key.removeprefix("vit.")
        if _TRANSFORMERS_LEFT_OUT.fullmatch(name):
            left_out.append(key)
            continue
        for pattern, target in _TRANSFORMERS_RENAMES:
            if pattern.fullmatch(name):
                renamed[pattern.sub(target, name)] = tensor
                break
        else:
            unknown.append(key)
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in renamed.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.(query|key|value)\.(weight|bias)", key)
        if match is None:
            merged[key] = tensor
        elif match.group(2) == "query":
            block, kind = match.group(1), match.group(3)
            parts = [renamed.get(f"blocks.{block}.attn.{p}.{kind}") for p in ("query", "key", "value")]
            if any(p is None for p in parts):
                continue  # reported as a missing qkv key below
            merged[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return merged, left_out, unknown


def timm_to_transformers(state: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """The inverse of `transformers_to_timm` (backbone keys, transformers v4 names) — for checks and tests."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if match is None:
            simple = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                      "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                      "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                      "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
            if key in simple:
                out[prefix + simple[key]] = tensor
            continue
        block, part, kind = match.groups()
        layer = f"{prefix}encoder.layer.{block}."
        if part == "attn.qkv":
            for name, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0), strict=True):
                out[f"{layer}attention.attention.{name}.{kind}"] = chunk.clone()
        else:
            names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                     "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}
            out[f"{layer}{names[part]}.{kind}"] = tensor
    return out


def _transformers_name(key: str, prefix: str) -> str:
    """A timm key as a transformers file names it (q/k/v for the merged qkv)."""
    dummy = torch.zeros(3)
    names = sorted(timm_to_transformers({key: dummy}, prefix))
    if len(names) == 3:  # attn.qkv -> query / key / value
        return names[0].replace(".attention.key.", ".attention.{query,key,value}.")
    return names[0] if names else key


def _expected_shapes(arch: dict[str, Any], positions: int) -> dict[str, tuple[int, ...]]:
    d, m, p = arch["hidden_size"], arch["mlp_dim"], arch["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d), "pos_embed": (1, positions, d),
        "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
    }
    for i in range(arch["num_layers"]):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
            b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,),
        })
        if arch["qkv_bias"]:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
    return shapes


def _heads(width: int, source: Path, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    heads = _HEADS_BY_WIDTH.get(width, width // 64 if width % 64 == 0 else 0)
    if not heads:
        raise ValueError(f"ViT weights '{source}' do not say how many attention heads width {width} has; "
                         "set model.kwargs.num_heads")
    log.info("ViT weights '%s' do not name their attention heads: %d assumed for width %d (set "
             "model.kwargs.num_heads otherwise)", source, heads, width)
    return heads


def _infer_architecture(state: dict[str, torch.Tensor], layout: str, source: Path, num_heads: int | None,
                        layer_norm_eps: float | None) -> tuple[dict[str, Any], int]:
    """Architecture and trained input size from the tensor shapes (a timm file, or no config.json)."""
    proj = state.get("patch_embed.proj.weight")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    pos = state.get("pos_embed")
    if proj is None or fc1 is None or pos is None or proj.ndim != 4:
        raise ValueError(f"ViT weights '{source}' lack the patch embedding, position embedding or first block")
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens = int(pos.shape[1])
    grid = math.isqrt(tokens - 1) if math.isqrt(tokens - 1) ** 2 == tokens - 1 else math.isqrt(tokens)
    arch = {
        "patch_size": patch, "hidden_size": width, "mlp_dim": int(fc1.shape[0]), "num_layers": layers,
        "num_heads": _heads(width, source, num_heads), "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layer_norm_eps": _LAYER_NORM_EPS[layout] if layer_norm_eps is None else layer_norm_eps,
    }
    return arch, grid * patch


def _config_architecture(config: dict[str, Any], source: Path) -> tuple[dict[str, Any], int, float]:
    """Architecture, trained input size and dropout from a transformers ViT config.json (ViTConfig defaults)."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"ViT weights '{source}': activation '{config['hidden_act']}' is not supported; "
                         "expected 'gelu'")
    if int(config.get("num_channels", 3)) != 3:
        raise ValueError(f"ViT weights '{source}' take {config['num_channels']} input channels; expected 3 (RGB)")
    arch = {
        "patch_size": _square(config.get("patch_size", 16), "patch size", source),
        "hidden_size": int(config.get("hidden_size", 768)),
        "mlp_dim": int(config.get("intermediate_size", 3072)),
        "num_layers": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
    }
    image_size = _square(config.get("image_size", 224), "image size", source)
    return arch, image_size, float(config.get("hidden_dropout_prob", 0.0))


def _config_normalization(config: dict[str, Any] | None, folder: Path) -> dict[str, list[float]] | None:
    """Mean/std the weights were trained with, from preprocessor_config.json (transformers) or timm's config."""
    sources = []
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        sources.append(json.loads(preprocessor.read_text()))
    if config is not None:
        sources.append(config.get("pretrained_cfg") or {})
    for source in sources:
        mean, std = source.get("image_mean", source.get("mean")), source.get("image_std", source.get("std"))
        if mean is not None and std is not None:
            return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return None


def read_pretrained_vit(
    path: str | Path, num_heads: int | None = None, layer_norm_eps: float | None = None
) -> PretrainedViT:
    """Read and check local ViT weights (transformers or timm layout).

    A file without a transformers config.json does not record its attention heads or layer-norm epsilon:
    `num_heads` (default: by width, 64 channels a head) and `layer_norm_eps` (default: timm's 1e-6, transformers'
    1e-12) fill them in.
    """
    source = Path(path)
    weights_file, config = _locate(source)
    raw = _read_tensors(weights_file)
    names = sorted(raw)
    if any(k.removeprefix("vit.").startswith(("embeddings.", "encoder.layer.", "layers.")) for k in names):
        layout = "transformers"
        state, left_out, unknown = transformers_to_timm(raw)
    elif "patch_embed.proj.weight" in raw:
        layout = "timm"
        left_out = [k for k in names if _TIMM_LEFT_OUT.fullmatch(k)]
        unknown = [k for k in names if not _TIMM_KEY.fullmatch(k) and k not in left_out]
        state = {k: v for k, v in raw.items() if _TIMM_KEY.fullmatch(k)}
    else:
        raise ValueError(f"ViT weights '{source}' are neither a transformers ViT (embeddings.*, encoder.layer.N.*) "
                         f"nor a timm ViT (patch_embed.proj, blocks.N.attn.qkv); first keys: {_first(names)}")
    if unknown:
        raise ValueError(f"ViT weights '{source}' hold keys that a {layout} ViT backbone does not have: "
                         f"{_first(sorted(unknown))}")
    dropout = 0.0
    if layout == "transformers" and config is not None and "hidden_size" in config:
        arch, image_size, dropout = _config_architecture(config, source)
    else:
        arch, image_size = _infer_architecture(state, layout, source, num_heads, layer_norm_eps)
    if arch["hidden_size"] % arch["num_heads"]:
        raise ValueError(f"ViT weights '{source}': width {arch['hidden_size']} is not divisible by "
                         f"{arch['num_heads']} heads")
    if image_size % arch["patch_size"]:
        raise ValueError(f"ViT weights '{source}': image size {image_size} is not a multiple of the patch size "
                         f"{arch['patch_size']}")
    grid = image_size // arch["patch_size"]
    # timm's `no_embed_class` ViTs have no position embedding for the class token.
    has_class_position = "pos_embed" in state and state["pos_embed"].shape[1] != grid * grid
    expected = _expected_shapes(arch, grid * grid + int(has_class_position))
    prefix = "vit." if any(k.startswith("vit.") for k in names) else ""

    def named(key: str) -> str:  # a key as the file names it
        return key if layout == "timm" else _transformers_name(key, prefix)

    missing = [named(k) for k in expected if k not in state]
    if missing:
        raise ValueError(f"ViT weights '{source}' lack keys of a {arch['num_layers']}-layer {layout} ViT: "
                         f"{_first(missing)}")
    extra = sorted(named(k) for k in set(state) - set(expected))
    if extra:
        raise ValueError(f"ViT weights '{source}' hold keys that a {arch['num_layers']}-layer {layout} ViT does not "
                         f"have: {_first(extra)}")
    wrong = [f"{named(k)} {tuple(state[k].shape)} (expected {shape})" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"ViT weights '{source}' have shapes that do not fit the architecture "
                         f"(width {arch['hidden_size']}, mlp {arch['mlp_dim']}, patch {arch['patch_size']}, "
                         f"{image_size} px): {_first(wrong, 2)}")
    return PretrainedViT(source, layout, arch, image_size, state, dropout,
                         _config_normalization(config, weights_file.parent), left_out)


def resize_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g*g, D) patch position embeddings resampled to (1, grid*grid, D): bicubic, exactly as transformers'
    `interpolate_pos_encoding`, so a resized model matches transformers' ViT run at the new size."""
    old = math.isqrt(pos.shape[1])
    if old == grid:
        return pos
    image = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def timm_to_monai(weights: PretrainedViT, grid: int) -> dict[str, torch.Tensor]:
    """The backbone in MONAI ViT names, position embeddings resized to `grid` x `grid` patches."""
    state = weights.state
    cls, pos = state["cls_token"], state["pos_embed"]
    if math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
        # MONAI adds no position embedding to the class token, so its pretrained one is folded into the token.
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    out = {"cls_token": cls, "patch_embedding.position_embeddings": resize_position_embeddings(pos, grid)}
    renames = {"patch_embed.proj.": "patch_embedding.patch_embeddings.", "attn.proj.": "attn.out_proj.",
               "mlp.fc1.": "mlp.linear1.", "mlp.fc2.": "mlp.linear2."}
    for key, tensor in state.items():
        if key in ("cls_token", "pos_embed"):
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = tensor
    return out


def load_pretrained_vit(vit: nn.Module, weights: PretrainedViT, img_size: int) -> None:
    """Copy a pretrained backbone into a MONAI ViT built (with a class token) for `img_size` px inputs."""
    grid = img_size // weights.architecture["patch_size"]
    old_grid = weights.image_size // weights.architecture["patch_size"]
    if grid != old_grid:
        log.info("ViT position embeddings interpolated (bicubic) from %dx%d to %dx%d patches: the weights were "
                 "trained at %d px, the model takes %d px", old_grid, old_grid, grid, grid, weights.image_size,
                 img_size)
    missing, unexpected = vit.load_state_dict(timm_to_monai(weights, grid), strict=False)
    missing = [k for k in missing if ".norm_cross_attn." not in k]  # MONAI builds it even without cross-attention
    if missing or unexpected:
        raise ValueError(f"ViT weights '{weights.source}' do not map onto lesionlab's ViT: missing "
                         f"{_first(missing)}; unexpected {_first(unexpected)}")
    log.info("ViT backbone loaded from '%s' (%s); the classification head is new", weights.source,
             weights.describe())
