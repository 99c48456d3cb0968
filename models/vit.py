"""lesionlab's ViT: MONAI's 2-D ViT, optionally with a class token, so that ImageNet-pretrained ViTs (Hugging Face
`transformers`, timm) load into it and compute the same function (see models/vit_weights.py)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from models.classifier import ImageClassifier, ViTBackbone

# The architecture of the randomly initialised ViT (6 layers, width 192): mean-pooled patch tokens, no class token,
# MONAI's defaults for the attention bias and layer-norm epsilon. A pretrained ViT takes every value from its weights.
VIT_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "hidden_size": 192,
    "mlp_dim": 768,
    "num_layers": 6,
    "num_heads": 3,
    "qkv_bias": False,
    "layer_norm_eps": 1e-5,
    "pool": "mean",
}


class ClassTokenViTBackbone(nn.Module):
    """MONAI's 2-D ViT with a class token; the embedding is the final layer-normed class token, the read-out of
    the original ViT and of `transformers`' ViTForImageClassification."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return tokens[:, 0]


def build_vit(
    num_classes: int,
    img_size: int,
    patch_size: int,
    hidden_size: int,
    mlp_dim: int,
    num_layers: int,
    num_heads: int,
    qkv_bias: bool,
    layer_norm_eps: float,
    pool: Literal["mean", "cls"],
    dropout: float,
) -> ImageClassifier:
    """A ViT classifier: MONAI ViT backbone (square `img_size` input) -> embedding -> dropout -> linear head."""
    from monai.networks.nets import ViT

    if img_size % patch_size:
        raise ValueError(f"ViT input size {img_size} px is not a multiple of the patch size {patch_size} px")
    if pool not in ("mean", "cls"):
        raise ValueError(f"ViT pool '{pool}' is unknown; expected 'mean' (patch tokens) or 'cls' (class token)")
    if hidden_size % num_heads:
        raise ValueError(f"ViT width {hidden_size} is not divisible by its {num_heads} attention heads")
    vit = ViT(
        in_channels=3,
        img_size=(img_size, img_size),
        patch_size=(patch_size, patch_size),
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        classification=False,
        spatial_dims=2,
        post_activation=None,
        dropout_rate=dropout,
        qkv_bias=qkv_bias,
        save_attn=True,
    )
    # MONAI hard-codes nn.LayerNorm's 1e-5; pretrained ViTs use 1e-12 (transformers) or 1e-6 (timm).
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = layer_norm_eps
    if pool == "cls":
        # MONAI's ViT prepends `cls_token` whenever it has one; it adds no position embedding to it (a pretrained
        # class position embedding is folded into the token when loading).
        vit.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(vit.cls_token, std=0.02)
        backbone: nn.Module = ClassTokenViTBackbone(vit)
    else:
        backbone = ViTBackbone(vit)
    return ImageClassifier(backbone, hidden_size, num_classes, dropout)
