"""A backbone that maps images to an embedding, followed by a linear classification head."""

from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Backbone -> embedding -> dropout -> linear head.

    Splitting the embedding from the head is what decoupled training (feature-space SMOTE, head re-training)
    and explanation (Grad-CAM on the backbone) build on.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (batch, embed_dim) embedding."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))


class FeatureMap(nn.Identity):
    """Marks a CNN backbone's last spatial feature map, after its final activation, where class-activation maps
    (Grad-CAM) read it. An identity: it changes neither the outputs nor the weights file."""


class SmallCNN(nn.Module):
    """A plain VGG-style baseline: conv-BN-ReLU blocks, each doubling the width and halving the size."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_map = FeatureMap()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(self.features(x))).flatten(1)


class ViTBackbone(nn.Module):
    """MONAI's 2-D ViT without its classification token; the embedding is the mean of the patch tokens."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return tokens.mean(dim=1)
