"""SC-MIL: gated-attention multiple instance learning with a supervised contrastive bag loss.

Instance encoder -> instance embedding -> gated attention pooling (Ilse et al. 2018) -> bag embedding, which feeds
a projection head (for SupCon, Khosla et al. 2020) and a linear classifier. SC-MIL (Juyal et al., WACV 2024) trains
with L = beta_t * L_SupCon + (1 - beta_t) * L_CE, beta_t going from 1 to 0; ABMIL is the same net with CE only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("parabolic", "linear", "step")
METHODS = ("scmil", "abmil")


class GatedAttention(nn.Module):
    """Gated attention pooling weights a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) (Ilse et al., eq. 9)."""

    def __init__(self, in_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, hidden_dim)
        self.U = nn.Linear(in_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights (B, N) for instance embeddings (B, N, D); padded instances (mask False) get 0."""
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=1)


@dataclass
class MILOutput:
    """Everything one forward pass over a batch of bags gives."""

    logits: torch.Tensor  # (B, C)
    bag_embedding: torch.Tensor  # (B, E)
    projection: torch.Tensor  # (B, P), L2-normalised, for the contrastive loss
    attention: torch.Tensor  # (B, N), each row sums to 1 over the real instances


class SCMIL(nn.Module):
    """Attention MIL network; inputs are bags of patches (B, N, 3, H, W) or of cached features (B, N, D)."""

    def __init__(
        self,
        num_classes: int,
        encoder: nn.Module,
        feature_dim: int,
        embed_dim: int = 256,
        attention_dim: int = 128,
        projection_dim: int = 128,
        dropout: float = 0.25,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for parameter in self.encoder.parameters():
                parameter.requires_grad_(False)
        self.instance_fc = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention = GatedAttention(embed_dim, attention_dim)
        self.projection = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, projection_dim)
        )
        self.head = nn.Linear(embed_dim, num_classes)

    def train(self, mode: bool = True) -> SCMIL:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen BatchNorm statistics stay those of the pre-trained encoder
        return self

    def encode_instances(self, patches: torch.Tensor) -> torch.Tensor:
        """Instance features (N, feature_dim) for patches (N, 3, H, W); this is what an embedding cache stores."""
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(patches)
        return self.encoder(patches)

    def forward_bags(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Run a padded batch of bags; `mask` (B, N) marks real instances (None: all are real)."""
        if x.dim() == 5:
            batch, n = x.shape[:2]
            features = self.encode_instances(x.flatten(0, 1)).view(batch, n, -1)
        elif x.dim() == 3:
            features = x
        else:
            raise ValueError(
                f"expected bags of patches (B, N, 3, H, W) or of features (B, N, D), got shape {tuple(x.shape)}"
            )
        if features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"instance features have {features.shape[-1]} dims; this network expects {self.feature_dim}"
            )
        h = self.instance_fc(features)
        attention = self.attention(h, mask)
        bag = torch.einsum("bn,bnd->bd", attention, h)
        projection = F.normalize(self.projection(bag), dim=1)
        return MILOutput(self.head(bag), bag, projection, attention)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_all: bool = False
    ) -> torch.Tensor | MILOutput:
        """Bag logits (B, C); with `return_all`, the MILOutput (through forward, so DDP wrappers see the call)."""
        output = self.forward_bags(x, mask)
        return output if return_all else output.logits


def build_scmil(
    num_classes: int,
    img_size: int,
    encoder: str = "small-cnn",
    encoder_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    freeze_encoder: bool = False,
    embed_dim: int = 256,
    attention_dim: int = 128,
    projection_dim: int = 128,
    dropout: float = 0.25,
    **_: Any,
) -> SCMIL:
    """SC-MIL / ABMIL net whose instance encoder is a registry backbone (`small-cnn`, `efficientnet-lite0`, ...)."""
    from models.registry import build_model

    if encoder == "scmil":
        raise ValueError("the SC-MIL instance encoder must be an image backbone, not 'scmil'")
    kwargs = dict(encoder_kwargs or {})
    if pretrained:
        kwargs["pretrained"] = True
    image_net = build_model(encoder, num_classes=2, img_size=img_size, **kwargs)
    if not hasattr(image_net, "backbone") or not hasattr(image_net, "embed_dim"):
        raise ValueError(f"encoder '{encoder}' is not an ImageClassifier with a backbone and embed_dim")
    return SCMIL(
        num_classes,
        image_net.backbone,
        image_net.embed_dim,
        embed_dim=embed_dim,
        attention_dim=attention_dim,
        projection_dim=projection_dim,
        dropout=dropout,
        freeze_encoder=freeze_encoder,
    )


def supcon_loss(projection: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss L_out (Khosla et al. 2020, eq. 2) over L2-normalised embeddings (B, D).

    Anchors without any positive in the batch are left out; with none left the loss is 0 (still differentiable).
    """
    if projection.dim() != 2 or labels.shape != projection.shape[:1]:
        raise ValueError(
            f"expected embeddings (B, D) and labels (B,), got {tuple(projection.shape)} and {tuple(labels.shape)}"
        )
    batch = projection.shape[0]
    similarity = projection @ projection.T / temperature
    self_mask = torch.eye(batch, dtype=torch.bool, device=projection.device)
    # log-softmax over every other sample a != i (the max is subtracted by logsumexp for stability)
    log_prob = similarity - torch.logsumexp(similarity.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has_positive = counts > 0
    if not has_positive.any():
        return projection.sum() * 0.0
    mean_log_prob = (log_prob * positives).sum(1)[has_positive] / counts[has_positive]
    return -mean_log_prob.mean()


def beta_schedule(epoch: int, epochs: int, kind: str = "parabolic", step_at: float = 0.5) -> float:
    """beta_t weighting SupCon against CE: 1 at the first epoch, 0 at the last.

    parabolic: 1 - (t/T)^2 (representation learning dominates early); linear: 1 - t/T; step: 1 before
    `step_at` of training, 0 from there on. t is the 0-based epoch, T = epochs - 1.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown beta schedule '{kind}'; expected one of {SCHEDULES}")
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is outside a run of {epochs} epochs (expected 0 <= epoch < epochs)")
    progress = epoch / (epochs - 1) if epochs > 1 else 1.0
    if kind == "parabolic":
        return 1.0 - progress**2
    if kind == "linear":
        return 1.0 - progress
    return 1.0 if progress < step_at else 0.0


class SCMILLoss:
    """L = beta_t * SupCon(projection) + (1 - beta_t) * CE(logits); method 'abmil' is CE only (beta_t = 0)."""

    def __init__(
        self,
        epochs: int,
        method: str = "scmil",
        schedule: str = "parabolic",
        temperature: float = 0.1,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown MIL method '{method}'; expected one of {METHODS}")
        if temperature <= 0 or not math.isfinite(temperature):
            raise ValueError(f"SupCon temperature must be a positive number, got {temperature}")
        self.epochs = epochs
        self.method = method
        self.schedule = schedule
        self.temperature = temperature
        self.class_weights = class_weights

    def beta(self, epoch: int) -> float:
        """The SupCon weight at this epoch."""
        return 0.0 if self.method == "abmil" else beta_schedule(epoch, self.epochs, self.schedule)

    def __call__(self, output: MILOutput, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        weights = None if self.class_weights is None else self.class_weights.to(output.logits.device)
        ce = F.cross_entropy(output.logits, labels, weight=weights)
        beta = self.beta(epoch)
        if beta == 0.0:
            return ce, {"ce": float(ce.detach()), "supcon": 0.0, "beta": 0.0}
        contrastive = supcon_loss(output.projection, labels, self.temperature)
        loss = beta * contrastive + (1.0 - beta) * ce
        return loss, {"ce": float(ce.detach()), "supcon": float(contrastive.detach()), "beta": beta}
