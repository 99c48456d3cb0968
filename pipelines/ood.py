"""Out-of-distribution score: how unlike the training images an input looks to the classifier.

The default score is the Mahalanobis distance of an image's penultimate features (the input of the linear head)
to the nearest class mean, under class-conditional Gaussians that share one covariance; the covariance is a
Ledoit-Wolf shrinkage estimate, so it stays invertible with more feature dimensions than images. By default each
feature vector is first divided by its Euclidean norm (Mueller & Hein 2025): on the shipped bundle this flags far more
microscopy and photographs at the same false-alarm rate (benchmarks/results/ood). The energy score on the logits is
the other method. Either way the threshold is a percentile of the validation images' scores, so about
(100 - percentile) % of in-distribution images are flagged; the score warns, it never refuses.

References:
    Lee, Lee, Lee, Shin. A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks. NeurIPS 2018 (class-conditional Gaussians with a tied covariance; confidence score, eq. 2).
    Liu, Wang, Owens, Li. Energy-based Out-of-distribution Detection. NeurIPS 2020 (energy −T·logsumexp(f/T), eq. 1).
    Ledoit, Wolf. A well-conditioned estimator for large-dimensional covariance matrices. J. Multivar. Anal. 2004.
    Mueller, Hein. Mahalanobis++: Improving OOD Detection via Feature Normalization. ICML 2025 (l2-normalised
    features before the Gaussian fit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OOD_METHODS = ("mahalanobis", "energy")
NORMALIZATIONS = ("l2", "none")
DEFAULT_PERCENTILE = 99.0
MAX_TRAIN_IMAGES = 2000
MIN_PER_CLASS = 30
FEATURES = ("input of the linear classification head (pooled penultimate features) of the first test-time view, "
            "the un-augmented evaluation crop; an ensemble uses its first member")


@dataclass
class OODDetector:
    """A fitted out-of-distribution score: the card's `ood` block and the arrays it needs (class means, precision)."""

    block: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return float(self.block["threshold"])

    def score(self, features: np.ndarray | None, logits: np.ndarray | None = None) -> np.ndarray:
        """(N,) scores; higher means further from the training images."""
        return ood_scores(self.block, self.tensors, features, logits)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) True where a score is above the threshold."""
        return np.asarray(scores) > self.threshold

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as float32 CPU tensors, as the bundle stores them."""
        return {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
                for name, value in self.tensors.items()}


def normalized(features: np.ndarray, normalization: str) -> np.ndarray:
    """Features as the Gaussians see them: divided by their Euclidean norm ("l2") or as they are ("none")."""
    features = np.asarray(features, dtype=np.float64)
    if normalization == "none":
        return features
    if normalization == "l2":
        return features / np.clip(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12, None)
    raise ValueError(f"unknown feature normalization '{normalization}'; expected one of {NORMALIZATIONS}")


def _mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N,) min over classes of sqrt((f - mu_c)^T P (f - mu_c)) (Lee et al. 2018, eq. 2, as a distance)."""
    features = np.asarray(features, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"features must be (images, {means.shape[1]}), got shape {features.shape}")
    diff = features[:, None, :] - means[None, :, :]  # (N, C, D)
    squared = np.einsum("ncd,de,nce->nc", diff, precision, diff)
    return np.sqrt(np.clip(squared, 0.0, None)).min(axis=1)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) energy −T·logsumexp(logits / T) (Liu et al. 2020, eq. 1); higher means less like the training data."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    return -temperature * (top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1)))


def ood_scores(
    block: dict[str, Any], tensors: dict[str, Any], features: np.ndarray | None, logits: np.ndarray | None = None
) -> np.ndarray:
    """(N,) out-of-distribution scores of a card's `ood` block for penultimate features (and logits, for energy)."""
    method = block.get("method")
    if method == "mahalanobis":
        if features is None:
            raise ValueError("the Mahalanobis score needs the penultimate features; none were given")
        features = normalized(features, block.get("feature_normalization", "none"))
        return _mahalanobis(features, np.asarray(tensors["class_means"]), np.asarray(tensors["precision"]))
    if method == "energy":
        if logits is None:
            raise ValueError("the energy score needs the logits; none were given")
        return energy(logits, float(block.get("temperature", 1.0)))
    raise ValueError(f"unknown out-of-distribution method '{method}'; expected one of {OOD_METHODS}")


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    return {f"p{q:g}": float(np.percentile(scores, q)) for q in (50, 95, 99)}


def fit_ood(
    train_features: np.ndarray,
    train_labels: Sequence[int],
    val_features: np.ndarray,
    percentile: float = DEFAULT_PERCENTILE,
    method: str = "mahalanobis",
    val_logits: np.ndarray | None = None,
    fitted_on: str = "",
    normalization: str = "l2",
) -> OODDetector:
    """Fit the score on training features and set its threshold at the `percentile` of the validation scores.

    Mahalanobis: class means and a shared Ledoit-Wolf covariance of `train_features` (N, D) with `train_labels`,
    after `normalization` ("l2" or "none"); energy: nothing to fit but the threshold, from `val_logits`. Returns the
    card's `ood` block and the arrays.
    """
    from sklearn.covariance import LedoitWolf

    if method not in OOD_METHODS:
        raise ValueError(f"unknown out-of-distribution method '{method}'; expected one of {OOD_METHODS}")
    if not 50.0 <= percentile < 100.0:
        raise ValueError(f"percentile is {percentile}; expected a value in [50, 100), e.g. 99 to flag about 1 %")
    train_features = np.asarray(train_features, dtype=np.float64)
    val_features = np.asarray(val_features, dtype=np.float64)
    labels = np.asarray(train_labels)
    if val_features.ndim != 2 or len(val_features) < 2:
        raise ValueError(f"validation features of shape {val_features.shape}; expected (images, features) with at "
                         "least 2 images")
    if method == "mahalanobis" and (train_features.ndim != 2 or len(labels) != len(train_features)
                                    or train_features.shape[1] != val_features.shape[1] or len(labels) < 2):
        raise ValueError(f"{len(labels)} labels for training features of shape {train_features.shape}; expected "
                         f"(images, {val_features.shape[1]}) with one label per image and at least 2 images")
    block: dict[str, Any] = {
        "method": method,
        "percentile": float(percentile),
        "fitted_on": fitted_on,
        "n_train": int(len(train_features)),
        "n_val": int(len(val_features)),
        "feature_dim": int(val_features.shape[1]),
        "features": FEATURES,
    }
    tensors: dict[str, np.ndarray] = {}
    if method == "mahalanobis":
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown feature normalization '{normalization}'; expected one of {NORMALIZATIONS}")
        train_features = normalized(train_features, normalization)
        classes = np.unique(labels)
        means = np.stack([train_features[labels == c].mean(axis=0) for c in classes])
        centred = train_features - means[np.searchsorted(classes, labels)]
        covariance = LedoitWolf(assume_centered=True).fit(centred)
        tensors = {"class_means": means.astype(np.float32), "precision": covariance.precision_.astype(np.float32)}
        block.update(
            classes=[int(c) for c in classes],
            feature_normalization=normalization,
            covariance="shared across classes (tied), Ledoit-Wolf shrinkage",
            shrinkage=float(covariance.shrinkage_),
            score="min over classes of the Mahalanobis distance to the class mean (Lee et al. 2018)",
        )
        val_scores = ood_scores(block, tensors, val_features)
    else:
        if val_logits is None or len(val_logits) != len(val_features):
            raise ValueError("the energy score's threshold needs the validation logits, one row per image")
        block.update(temperature=1.0, score="energy -logsumexp(logits) of the uncalibrated logits (Liu et al. 2020)")
        val_scores = ood_scores(block, tensors, None, val_logits)
    block["threshold"] = float(np.percentile(val_scores, percentile))
    block["threshold_rule"] = (f"the {percentile:g}th percentile of the validation images' scores: about "
                               f"{100 - percentile:g} % of in-distribution images are flagged")
    block["validation_flagged"] = float(np.mean(val_scores > block["threshold"]))
    block["validation_scores"] = _quantiles(val_scores)
    return OODDetector(block, tensors)


def stratified_subsample(labels: Sequence[Any], max_images: int, seed: int = 0,
                         min_per_class: int = MIN_PER_CLASS) -> np.ndarray:
    """Sorted row indices of at most `max_images` rows, each class in proportion but with at least
    min(its count, `min_per_class`) rows, so that rare classes still get a mean (the largest class gives way)."""
    labels = np.asarray(labels)
    if len(labels) <= max_images:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    floors = np.minimum(counts, min(min_per_class, max_images // len(values)))
    quotas = np.maximum(floors, np.rint(max_images * counts / len(labels)).astype(int))
    while quotas.sum() > max_images:  # the classes with most rows above their floor give way
        i = int(np.argmax(quotas - floors))
        quotas[i] -= min(int(quotas.sum()) - max_images, int(quotas[i] - floors[i]))
    chosen = [rng.choice(np.flatnonzero(labels == value), size=quota, replace=False)
              for value, quota in zip(values, quotas, strict=True)]
    return np.sort(np.concatenate(chosen))


def feature_layer(model: nn.Module) -> nn.Linear | None:
    """The linear head whose input is the penultimate feature vector (None for a model without one)."""
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Linear) else None


@contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the inputs of `model`'s linear head during the forwards run in this thread (a forward hook)."""
    head = feature_layer(model)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no linear `head`; the out-of-distribution score reads the "
                        "head's input features")
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            captured.append(inputs[0].detach())

    handle = head.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def first_view_features(captured: list[torch.Tensor], n_images: int) -> np.ndarray:
    """(N, D) features of the first test-time view from what `head_inputs` caught in one `view_logits` call: the
    views run as one concatenated forward (view 0 first) or one forward each (view 0 first)."""
    if not captured or len(captured[0]) < n_images:
        raise RuntimeError(f"the head saw {len(captured[0]) if captured else 0} images; expected {n_images}")
    return captured[0][:n_images].float().cpu().numpy()


def dataset_features(model: nn.Module, dataset, batch_size: int = 32,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((N, D) penultimate features, (N, C) logits, (N,) labels) of one un-augmented view of each dataset item
    (the layout change runs outside inference mode, so the model stays trainable afterwards)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    model.to(memory_format=torch.channels_last)  # faster on CPU; restored below
    features, logits, labels = [], [], []
    try:
        for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, leave=False,
                                    disable=len(dataset) < 256):
            batch = images.to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), head_inputs(model) as captured:
                out = model(batch).float()
            features.append(first_view_features(captured, len(batch)))
            logits.append(out.cpu().numpy())
            labels.append(np.asarray(targets))
    finally:
        model.to(memory_format=torch.contiguous_format)
    if not features:
        raise ValueError("the dataset is empty; the out-of-distribution score needs images to fit on")
    return np.concatenate(features), np.concatenate(logits), np.concatenate(labels)


def fit_model_ood(
    model: nn.Module,
    train_dataset,
    val_dataset,
    percentile: float = DEFAULT_PERCENTILE,
    method: str = "mahalanobis",
    fitted_on: str = "",
    normalization: str = "l2",
) -> OODDetector:
    """Features of a (sub-sampled) training dataset and of the validation dataset, then `fit_ood`; logs the cost."""
    started = time.perf_counter()
    val_features, val_logits, _ = dataset_features(model, val_dataset, desc="OOD features (validation)")
    if method == "energy":  # nothing is fitted on the training images
        train_features, train_labels = np.zeros((0, val_features.shape[1])), np.zeros(0, dtype=np.int64)
    else:
        train_features, _, train_labels = dataset_features(model, train_dataset, desc="OOD features (train)")
    detector = fit_ood(train_features, train_labels, val_features, percentile, method, val_logits, fitted_on,
                       normalization)
    seconds = time.perf_counter() - started
    detector.block["fit_seconds"] = round(seconds, 1)
    log.info("out-of-distribution score (%s) fitted on %d training + %d validation images in %.1f s; threshold "
             "%.3f (%g th percentile of validation)", method, len(train_features), len(val_features), seconds,
             detector.threshold, percentile)
    return detector


def detector_of(bundle: Any) -> OODDetector | None:
    """The out-of-distribution score a loaded bundle ships (an ensemble: its first member's), or None without one."""
    source = bundle.members[0] if getattr(bundle, "members", None) else bundle
    block = source.card.get("ood")
    if not block:
        return None
    if block.get("method") == "mahalanobis" and feature_layer(source.model) is None:
        raise ValueError(f"bundle '{source.path}' has a Mahalanobis `ood` block but its network has no linear head "
                         "whose input features it could score")
    tensors = {name: value.double().numpy() for name, value in source.extras.get("ood", {}).items()}
    return OODDetector(dict(block), tensors)
