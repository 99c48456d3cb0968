"""Decoupled classifier re-training (cRT): embed with the frozen backbone, re-train only the linear head, and move
the decision rule by the class priors.

References:
    Kang, Xie, Rohrbach, Yan, Gordo, Feng, Kalantidis. Decoupling Representation and Classifier for Long-Tailed
    Recognition. ICLR 2020 (classifier re-training, cRT).
    Buda, Maki, Mazurowski. A systematic study of the class imbalance problem in convolutional neural networks.
    Neural Networks 106, 2018 (thresholding by the class priors).
    Menon, Jayasumana, Rawat, Jain, Veit, Kumar. Long-Tail Learning via Logit Adjustment. ICLR 2021 (eq. 9,
    post-hoc logit adjustment).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.training.samplers import sampling_weights

__all__ = ["apply_prior_correction", "embed_dataset", "head_probs", "prior_corrected_probs", "train_head"]


def embed_dataset(model: nn.Module, dataset: Any, batch_size: int = 64, desc: str = "embedding") -> np.ndarray:
    """(N, D) float32 embeddings (the input of the model's linear head, one un-augmented view) of every item of an
    (image, label) dataset; the loop is `pipelines.ood.dataset_features`."""
    from pipelines.ood import dataset_features, feature_layer

    head = feature_layer(model)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no linear `head`; feature-space balancing needs an "
                        "ImageClassifier (backbone -> embedding -> linear head)")
    if len(dataset) == 0:
        return np.zeros((0, head.in_features), dtype=np.float32)
    features, _, _ = dataset_features(model, dataset, batch_size, desc=desc)
    return features.astype(np.float32, copy=False)


def head_probs(head: nn.Linear, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a linear head on (N, D) embeddings."""
    with torch.no_grad():
        logits = head(torch.as_tensor(features, dtype=torch.float32))
    return torch.softmax(logits, dim=-1).numpy()


def train_head(
    head: nn.Linear,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    loss_fn: nn.Module,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    sampler: str = "none",
    seed: int = 0,
) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Train a linear head on fixed embeddings (AdamW, cosine); keep the epoch with the best val balanced accuracy.

    Returns a trained copy of `head` (float32, CPU, eval mode) and the per-epoch history.
    """
    from sklearn.metrics import balanced_accuracy_score

    torch.manual_seed(seed)
    head = copy.deepcopy(head).float().cpu()
    x = torch.as_tensor(train_features, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    xv = torch.as_tensor(val_features, dtype=torch.float32)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(x) / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    weights = None if sampler == "none" else torch.as_tensor(sampling_weights(y.numpy(), head.out_features, sampler))
    loss_fn = loss_fn.cpu()
    best_state, best_score, history = copy.deepcopy(head.state_dict()), -1.0, []
    for epoch in range(epochs):
        head.train()
        if weights is None:
            order = torch.randperm(len(x), generator=generator)
        else:
            order = torch.multinomial(weights, len(x), replacement=True, generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = loss_fn(head(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        head.eval()
        with torch.no_grad():
            predicted = head(xv).argmax(1).numpy()
        score = float(balanced_accuracy_score(val_labels, predicted)) if len(xv) else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": total / len(order), "val_balanced_accuracy": score})
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return head, history


def prior_corrected_probs(probs: np.ndarray, priors: Sequence[float], tau: float = 1.0) -> np.ndarray:
    """p(c|x) / π_c^τ, renormalised: the Bayes rule for a uniform test prior (Buda et al. 2018 'thresholding';
    Menon et al. 2021 eq. 9, post-hoc logit adjustment)."""
    priors_arr = np.asarray(priors, dtype=np.float64)
    if (priors_arr <= 0).any() or priors_arr.shape != (np.asarray(probs).shape[1],):
        raise ValueError(f"priors must be {np.asarray(probs).shape[1]} positive class frequencies, got {priors_arr}")
    adjusted = np.asarray(probs, dtype=np.float64) / np.power(priors_arr / priors_arr.sum(), tau)
    return adjusted / adjusted.sum(axis=1, keepdims=True)


@torch.no_grad()
def apply_prior_correction(head: nn.Linear, priors: Sequence[float], tau: float = 1.0) -> nn.Linear:
    """Bake the prior correction into the head: bias_c -= τ log π_c, so every bundle loader applies it unchanged."""
    priors_arr = np.asarray(priors, dtype=np.float64)
    if head.bias is None or len(priors_arr) != head.out_features or (priors_arr <= 0).any():
        raise ValueError(f"prior correction needs a head with a bias and {head.out_features} positive priors")
    shift = torch.as_tensor(tau * np.log(priors_arr / priors_arr.sum()), dtype=head.bias.dtype)
    head.bias -= shift.to(head.bias.device)
    return head
