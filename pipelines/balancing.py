"""Class-imbalance toolkit: cost-sensitive losses, class-balanced samplers, feature-space SMOTE, threshold moving."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import WeightedRandomSampler

if TYPE_CHECKING:
    from pipelines.config import RunConfig

log = logging.getLogger(__name__)

FEATURE_METHODS = ("smote", "borderline-smote", "adasyn", "smote-tomek")
PIXEL_METHODS = ("smote", "borderline-smote", "adasyn")
MAX_PIXEL_SMOTE_SIZE = 64


def class_weights(counts: Sequence[int], scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights, normalised to mean 1.

    inverse:   w_c ∝ 1 / n_c
    effective: w_c ∝ (1 - β) / (1 - β^n_c)   (Cui et al. 2019, "effective number of samples", eq. 4)
    """
    counts_arr = np.asarray(counts, dtype=np.float64)
    if (counts_arr <= 0).any():
        raise ValueError(f"every class needs at least one training sample, got {counts_arr.astype(int).tolist()}")
    if scheme == "none":
        weights = np.ones_like(counts_arr)
    elif scheme == "inverse":
        weights = 1.0 / counts_arr
    elif scheme == "effective":
        if not 0 <= beta < 1:
            raise ValueError(f"effective-number beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - np.power(beta, counts_arr))
    else:
        raise ValueError(f"unknown class weighting '{scheme}'; expected none, inverse or effective")
    weights = weights / weights.mean()
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, eq. 5): -α_y (1 - p_t)^γ log p_t, averaged over the batch (not over Σ α)."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021, eq. 10): CE(logits + τ log π, y) during training only."""

    def __init__(self, priors: torch.Tensor, tau: float = 1.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("adjustment", tau * torch.log(priors.float()))
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, target, weight=self.weight)


def build_loss(
    name: str,
    counts: Sequence[int],
    weighting: str = "none",
    beta: float = 0.999,
    gamma: float = 2.0,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The training loss by name (ce, focal, logit-adjusted), optionally class-weighted."""
    weight = None if weighting == "none" else class_weights(counts, weighting, beta)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma, weight)
    if name == "logit-adjusted":
        priors = torch.tensor(counts, dtype=torch.float64)
        if (priors <= 0).any():
            raise ValueError(f"logit adjustment needs every class in the training data, got counts {list(counts)}")
        return LogitAdjustedLoss(priors / priors.sum(), tau, weight)
    raise ValueError(f"unknown loss '{name}'; expected ce, focal or logit-adjusted")


def sampling_weights(labels: Sequence[int], num_classes: int, mode: str) -> np.ndarray:
    """Per-sample weights: 'balanced' draws every class equally, 'sqrt' in proportion to sqrt(n_c)."""
    labels_arr = np.asarray(labels)
    counts = np.bincount(labels_arr, minlength=num_classes).astype(np.float64)
    if mode == "balanced":
        class_mass = np.ones(num_classes)
    elif mode == "sqrt":
        class_mass = np.sqrt(counts)
    else:
        raise ValueError(f"unknown sampler '{mode}'; expected none, balanced or sqrt")
    class_mass = np.where(counts > 0, class_mass, 0.0)
    per_sample = class_mass[labels_arr] / counts[labels_arr]
    return per_sample / per_sample.sum()


def build_sampler(labels: Sequence[int], num_classes: int, mode: str, seed: int = 0) -> WeightedRandomSampler | None:
    """A with-replacement sampler that re-weights classes for one epoch of len(labels) draws, or None."""
    if mode == "none":
        return None
    weights = sampling_weights(labels, num_classes, mode)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), True, generator)


@torch.inference_mode()
def embed_dataset(model: nn.Module, dataset, batch_size: int = 64, desc: str = "embedding") -> np.ndarray:
    """(N, D) float32 embeddings `model.forward_features` gives for every item of an (image, label) dataset."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features(); feature-space balancing needs an "
                        "ImageClassifier (backbone -> embedding -> linear head)")
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for images, _ in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc=desc, leave=False):
        chunks.append(model.forward_features(images.to(device)).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, getattr(model, "embed_dim", 0)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Configuration (the `balancing:` section of a run config)


class BalancingConfig(BaseModel):
    """The `balancing:` section: resampling method and space, head re-training and threshold moving."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "smote", "borderline-smote", "adasyn", "smote-tomek"] = "smote"
    space: Literal["feature", "pixel"] = "feature"
    target_ratio: float = Field(1.0, gt=0, le=1, description="each class grows to this fraction of the largest")
    k_neighbors: int = Field(5, ge=1)
    seed: int = 0
    # Decoupled classifier re-training (Kang et al. 2020, cRT) on the resampled training embeddings.
    head_init: Literal["reinit", "original"] = "reinit"
    head_loss: Literal["ce", "focal", "logit-adjusted"] = "ce"
    class_weighting: Literal["none", "inverse", "effective"] = "none"
    effective_beta: float = 0.999
    focal_gamma: float = 2.0
    logit_tau: float = 1.0
    sampler: Literal["none", "balanced", "sqrt"] = "none"
    head_epochs: int = Field(30, ge=1)
    head_lr: float = Field(1e-3, gt=0)
    head_weight_decay: float = Field(1e-4, ge=0)
    head_batch_size: int = Field(256, ge=1)
    embed_batch_size: int = Field(64, ge=1)
    # Threshold moving.
    prior_correction: bool = False
    prior_tau: float = 1.0
    target_sensitivity: float | None = Field(None, gt=0, le=1, description="default: training.target_sensitivity")
    bootstrap: int | None = Field(None, ge=0, description="resamples of the report's 95 % intervals; default "
                                  "pipelines.evaluation.BOOTSTRAP_RESAMPLES; 0: none")
    # Pixel-space SMOTE (small images only).
    pixel_size: int = Field(32, ge=8)
    contact_sheet_per_class: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "BalancingConfig":
        if self.space == "pixel":
            if self.method not in PIXEL_METHODS:
                raise ValueError(f"pixel-space resampling supports {list(PIXEL_METHODS)}, got '{self.method}'")
            if self.pixel_size > MAX_PIXEL_SMOTE_SIZE:
                raise ValueError(f"pixel-space SMOTE interpolates raw pixels; pixel_size {self.pixel_size} px is too "
                                 f"large, at most {MAX_PIXEL_SMOTE_SIZE} px is supported (use space: feature)")
        return self


def load_balancing_config(section: dict[str, Any] | BalancingConfig | None) -> BalancingConfig:
    """Validate a run config's `balancing:` section (None means all defaults)."""
    from pipelines.config import stage_settings

    return stage_settings({"balancing": section}, "balancing", BalancingConfig)


# --------------------------------------------------------------------------------------------------------------------
# SMOTE family (imbalanced-learn) and the leakage guard


def target_counts(counts: dict[Any, int], target_ratio: float = 1.0) -> dict[Any, int]:
    """Per-class sizes after oversampling: max(n_c, ceil(ratio * n_max)); no class shrinks."""
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    largest = max(counts.values())
    return {label: max(int(n), int(math.ceil(target_ratio * largest))) for label, n in counts.items()}


class FeatureResampler:
    """An imbalanced-learn SMOTE-family sampler by name; `fit_resample(X, y)` returns the resampled training set."""

    def __init__(self, method: str = "smote", target_ratio: float = 1.0, k_neighbors: int = 5, seed: int = 0) -> None:
        self.method = method
        self.target_ratio = target_ratio
        self.k_neighbors = k_neighbors
        self.seed = seed

    def _sampler(self, y: np.ndarray):
        from imblearn.combine import SMOTETomek
        from imblearn.over_sampling import ADASYN, SMOTE, BorderlineSMOTE

        labels, sizes = np.unique(y, return_counts=True)
        counts = dict(zip(labels.tolist(), sizes.tolist(), strict=True))
        strategy = {label: n for label, n in target_counts(counts, self.target_ratio).items() if n > counts[label]}
        smallest = min((counts[label] for label in strategy), default=self.k_neighbors + 1)
        if smallest < 2:
            raise ValueError(f"SMOTE needs at least 2 training samples in every class it oversamples, got {counts}")
        k = min(self.k_neighbors, smallest - 1)
        if k < self.k_neighbors:
            log.warning("k_neighbors lowered from %d to %d: a class has only %d training samples",
                        self.k_neighbors, k, smallest)
        if self.method == "smote":
            return SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=self.seed)
        if self.method == "borderline-smote":
            return BorderlineSMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=self.seed)
        if self.method == "adasyn":
            return ADASYN(sampling_strategy=strategy, n_neighbors=k, random_state=self.seed)
        if self.method == "smote-tomek":
            smote = SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=self.seed)
            return SMOTETomek(smote=smote, random_state=self.seed)
        raise ValueError(f"unknown resampling method '{self.method}'; expected one of {list(FEATURE_METHODS)}")

    def fit_resample(self, features: np.ndarray, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Resampled (features, labels); the input rows that survive come first, synthetic rows after."""
        features = np.asarray(features)
        labels = np.asarray(labels)
        if features.ndim != 2 or len(features) != len(labels):
            raise ValueError(f"expected features of shape (N, D) and N labels, got {features.shape} and {len(labels)}")
        sampler = self._sampler(labels)
        if not getattr(sampler, "sampling_strategy", None):
            return features.copy(), labels.copy()
        resampled, new_labels = sampler.fit_resample(features, labels)
        return np.asarray(resampled, dtype=features.dtype), np.asarray(new_labels)


def _row_keys(features: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest() for row in features]


def oversample_split(
    rows: pd.DataFrame,
    features: np.ndarray,
    resampler: FeatureResampler,
    split: str = "train",
    prefix: str = "smote",
) -> tuple[pd.DataFrame, np.ndarray]:
    """Resample the embeddings of the `split` rows (which must be 'train'); every other row is returned unchanged.

    Returns (rows, features): the input rows in their order (training rows removed by Tomek-link cleaning dropped)
    followed by synthetic rows with split=train, source=synthetic and an empty path.
    """
    if split != "train":
        raise ValueError(f"refusing to resample split '{split}': resampling touches the training split only, "
                         "so validation and test rows stay exactly as collected")
    if len(rows) != len(features):
        raise ValueError(f"{len(rows)} manifest rows but {len(features)} embeddings; expected one per row")
    rows = rows.reset_index(drop=True)
    train = (rows.split == "train").to_numpy()
    if not train.any():
        raise ValueError("no split=train rows to resample")
    new_x, new_y = resampler.fit_resample(features[train], rows.label[train].to_numpy())
    original = {key: i for i, key in zip(np.flatnonzero(train), _row_keys(features[train]), strict=True)}
    kept, synthetic = set(), []
    for j, key in enumerate(_row_keys(new_x)):
        if key in original and original[key] not in kept:
            kept.add(original[key])
        else:
            synthetic.append(j)
    keep_mask = ~train | np.isin(np.arange(len(rows)), sorted(kept))
    added = pd.DataFrame({
        "image_id": [f"{prefix}-{i:06d}" for i in range(len(synthetic))],
        "path": "",
        "label": new_y[synthetic].astype(str),
        "group": [f"{prefix}-{i:06d}" for i in range(len(synthetic))],
        "split": "train",
        "source": "synthetic",
    })
    out_rows = pd.concat([rows[keep_mask], added], ignore_index=True)
    for column in out_rows.columns:
        if out_rows[column].dtype == object:
            out_rows[column] = out_rows[column].fillna("")
    out_features = np.concatenate([features[keep_mask], new_x[synthetic]]).astype(features.dtype, copy=False)
    log.info("%s: %d training embeddings -> %d (+%d synthetic, -%d removed)", resampler.method, int(train.sum()),
             int((out_rows.split == "train").sum()), len(synthetic), int(train.sum()) - len(kept))
    return out_rows, out_features


# --------------------------------------------------------------------------------------------------------------------
# Decoupled classifier (head) training on embeddings


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
    """Train a linear head on fixed embeddings (AdamW, cosine); keep the epoch with the best val balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    torch.manual_seed(seed)
    head = copy.deepcopy(head).float().cpu()
    x = torch.as_tensor(train_features, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    xv = torch.as_tensor(val_features, dtype=torch.float32)
    num_classes = head.out_features
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(x) / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    weights = None if sampler == "none" else torch.as_tensor(sampling_weights(y.numpy(), num_classes, sampler))
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


# --------------------------------------------------------------------------------------------------------------------
# Threshold moving


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


# --------------------------------------------------------------------------------------------------------------------
# Feature-space SMOTE on a trained bundle: embed -> resample training embeddings -> re-train the head -> new bundle


def _split_probs(head: nn.Linear, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = head(torch.as_tensor(features, dtype=torch.float32))
    return torch.softmax(logits, dim=-1).numpy()


def _counts(labels: Sequence[str], class_names: Sequence[str]) -> dict[str, int]:
    series = pd.Series(list(labels), dtype=object)
    return {name: int((series == name).sum()) for name in class_names}


def balance_bundle(
    bundle_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    config: BalancingConfig | dict[str, Any] | None = None,
    target_sensitivity: float = 0.9,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Decoupled re-balancing of a trained image bundle: the backbone is kept, only the linear head is re-trained.

    Embeds the manifest's train, val and test rows with the bundle's backbone, oversamples the training embeddings
    (SMOTE family, training rows only), re-trains the head, optionally bakes in the prior correction, chooses the
    operating threshold on validation and writes a normal bundle to `out_dir`. Returns the report dict.
    """
    from models.bundle import load_bundle, save_bundle
    from pipelines.calibration import calibrate_and_score, calibration_method_of
    from pipelines.data import ImageDataset
    from pipelines.evaluation import (
        BOOTSTRAP_RESAMPLES,
        add_score_intervals,
        bootstrap_intervals,
        card_metrics,
        check_training_overlap,
        compute_metrics,
        paired_bootstrap_delta,
        source_metrics,
    )
    from pipelines.manifest import SPLITS, manifest_sha256, read_manifest
    from pipelines.prediction import card_tta
    from pipelines.transforms import card_transform

    config = load_balancing_config(config)
    if config.space != "feature":
        raise ValueError("balance_bundle re-trains a bundle's head in feature space; use pixel_smote for space=pixel")
    bundle = load_bundle(bundle_dir)
    card, model = copy.deepcopy(bundle.card), bundle.model
    if card.get("task", "image") != "image" or not isinstance(getattr(model, "head", None), nn.Linear):
        raise ValueError(f"bundle '{bundle_dir}' is not an image classifier with a linear head "
                         f"(task={card.get('task')}); feature-space balancing re-trains that head")
    class_names = list(card["class_names"])
    manifest = read_manifest(manifest_path)
    unknown = sorted(set(manifest.label) - set(class_names))
    if unknown:
        raise ValueError(f"manifest '{manifest_path}' has labels {unknown} the bundle does not know ({class_names})")
    # Same rows as training used: every training row, real validation and test rows.
    keep = (manifest.split == "train") | (manifest.split.isin(SPLITS) & (manifest.source == "real"))
    rows = manifest[keep].reset_index(drop=True)
    for split in ("train", "val"):
        if not (rows.split == split).any():
            raise ValueError(f"manifest '{manifest_path}' has no '{split}' rows; feature-space balancing needs both")
    # The validation and test rows choose the threshold and score the heads: they must not be training images.
    overlap = check_training_overlap(bundle_dir, bundle.card, rows[rows.split != "train"], "validation and test",
                                     [manifest_path])
    n_boot = BOOTSTRAP_RESAMPLES if config.bootstrap is None else config.bootstrap

    transform = card_transform(card)
    dataset = ImageDataset(rows, class_names, transform)
    features = embed_dataset(model, dataset, config.embed_batch_size, desc=f"embedding {len(rows)} images")
    original_head = copy.deepcopy(model.head).float()

    if config.method == "none":
        table, table_features = rows, features
    else:
        resampler = FeatureResampler(config.method, config.target_ratio, config.k_neighbors, config.seed)
        table, table_features = oversample_split(rows, features, resampler, "train", prefix=f"{config.method}")
    index = {name: i for i, name in enumerate(class_names)}
    masks = {split: (table.split == split).to_numpy() for split in SPLITS}
    labels = {split: np.array([index[c] for c in table.label[masks[split]]], dtype=np.int64) for split in SPLITS}
    feats = {split: table_features[masks[split]] for split in SPLITS}
    train_counts = list(_counts(table.label[masks["train"]], class_names).values())

    head = copy.deepcopy(original_head)
    if config.head_init == "reinit":
        torch.manual_seed(config.seed)
        head.reset_parameters()
    loss_fn = build_loss(config.head_loss, train_counts, config.class_weighting, config.effective_beta,
                         config.focal_gamma, config.logit_tau)
    head, history = train_head(
        head, feats["train"], labels["train"], feats["val"], labels["val"], loss_fn, config.head_epochs,
        config.head_lr, config.head_weight_decay, config.head_batch_size, config.sampler, config.seed,
    )
    if config.prior_correction:
        apply_prior_correction(head, np.asarray(train_counts, dtype=np.float64), config.prior_tau)

    malignant = [c for c in card.get("malignant_classes", []) if c in class_names]
    sensitivity = config.target_sensitivity or target_sensitivity
    # The before/after table compares the heads on the embeddings (one view, uncalibrated), with intervals and the
    # paired change; the bundle itself is re-calibrated below with its own test-time augmentation, and its card
    # shows those numbers.
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        if len(labels[split]):
            pair = {"before": _split_probs(original_head, feats[split]), "after": _split_probs(head, feats[split])}
            metrics[split] = {}
            for side, probs in pair.items():
                scored = compute_metrics(labels[split], probs, class_names, malignant)
                intervals = bootstrap_intervals(labels[split], probs, class_names, malignant, n_boot=n_boot)
                metrics[split][side] = card_metrics({**scored, "intervals": intervals} if intervals else scored)
            y_malignant = np.isin(np.asarray(class_names)[labels[split]], malignant)
            if n_boot and 0 < y_malignant.sum() < len(y_malignant):
                metrics[split]["change"] = paired_bootstrap_delta(labels[split], pair["before"], pair["after"],
                                                                  class_names, malignant, n_boot)

    model.head = head.to(next(model.parameters()).device)
    split_rows = {split: rows[(rows.split == split)] for split in ("val", "test")}
    scores = calibrate_and_score(
        model, ImageDataset(split_rows["val"], class_names, transform),
        ImageDataset(split_rows["test"], class_names, transform) if len(split_rows["test"]) else None,
        class_names, malignant, card_tta(card), calibration_method_of(card), sensitivity,
        logits_out=(Path(report_dir) if report_dir else Path(out_dir) / "balancing_report") / "logits.npz",
    )
    add_score_intervals(scores, class_names, malignant, n_boot)
    threshold = scores.threshold
    op = threshold["threshold"] if threshold else None
    best_epoch = int(np.argmax([h["val_balanced_accuracy"] for h in history])) + 1
    original_counts = _counts(rows.label[rows.split == "train"], class_names)
    balancing = {
        "method": config.method, "space": "feature", "target_ratio": config.target_ratio,
        "k_neighbors": config.k_neighbors, "seed": config.seed, "head_init": config.head_init,
        "head_loss": config.head_loss, "class_weighting": config.class_weighting, "sampler": config.sampler,
        "head_epochs": config.head_epochs, "best_epoch": best_epoch,
        "prior_correction": {"tau": config.prior_tau, "priors": train_counts} if config.prior_correction else None,
        "train_counts_before": original_counts,
        "train_counts_after": _counts(table.label[masks["train"]], class_names),
        "source_bundle": str(Path(bundle_dir).resolve()),
    }
    card.update({
        "operating_threshold": op,
        "threshold_metrics": threshold,
        "calibration": scores.calibration,
        "inference": {"tta": scores.tta},
        # Its own numbers; the source bundle's go apart, with its hash.
        "metrics": scores.card_metrics(),
        "source_metrics": source_metrics(bundle_dir, bundle.card),
        "manifest_sha256": manifest_sha256(manifest_path),
        "balancing": balancing,
    })
    card.pop("format_version", None)
    card.pop("versions", None)
    out_dir = save_bundle(out_dir, model.cpu(), card)
    report = {"bundle": str(out_dir), "balancing": balancing, "metrics": metrics, "threshold": threshold,
              "bundle_metrics": card["metrics"], "training_overlap": overlap, "history": history}
    report_path = write_balancing_report(report, Path(report_dir) if report_dir else out_dir / "balancing_report")
    report["report"] = str(report_path)
    log.info("balanced bundle written to %s (val balanced accuracy %.3f -> %.3f)", out_dir,
             metrics["val"]["before"]["balanced_accuracy"], metrics["val"]["after"]["balanced_accuracy"])
    return report


def write_balancing_report(report: dict[str, Any], out_dir: Path) -> Path:
    """`report.json` and a before/after `report.md` for one balancing run (95 % bootstrap intervals in brackets)."""
    from pipelines.evaluation import interval_text, training_overlap_lines

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    bal = report["balancing"]
    lines = [f"# Feature-space balancing: {bal['method']}", "", *training_overlap_lines(report.get("training_overlap")),
             f"Head re-trained ({bal['head_init']}, loss {bal['head_loss']}, weighting {bal['class_weighting']}, "
             f"sampler {bal['sampler']}, best epoch {bal['best_epoch']}/{bal['head_epochs']}); "
             f"prior correction: {'yes' if bal['prior_correction'] else 'no'}.", "",
             "| class | train before | train after |", "|---|---|---|"]
    for name, n in bal["train_counts_before"].items():
        lines.append(f"| {name} | {n} | {bal['train_counts_after'][name]} |")
    for split, pair in report["metrics"].items():
        ci = {side: pair[side].get("intervals") or {} for side in ("before", "after")}
        change = pair.get("change") or {}
        lines += ["", f"## {split} (heads on the embeddings, one view, uncalibrated)", "",
                  "| metric | before | after | change [95 % paired interval] |", "|---|---|---|---|"]
        for key in ("balanced_accuracy", "macro_auc", "malignant_auc", "accuracy"):
            if key in pair["after"]:
                d = change.get(key)
                delta = f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
                lines.append(f"| {key} | {pair['before'].get(key, float('nan')):.4f}"
                             f"{interval_text(ci['before'].get(key))} | {pair['after'][key]:.4f}"
                             f"{interval_text(ci['after'].get(key))} | {delta} |")
        for name, recall in pair["after"]["recall"].items():
            lines.append(f"| recall {name} | {pair['before']['recall'][name]:.3f}"
                         f"{interval_text(ci['before'].get('recall', {}).get(name))} | {recall:.3f}"
                         f"{interval_text(ci['after'].get('recall', {}).get(name))} | |")
    shipped = report.get("bundle_metrics") or {}
    for split in ("test", "validation"):
        block = shipped.get(split)
        if not block:
            continue
        ci = block.get("intervals") or {}
        lines += ["", f"## The balanced bundle as shipped ({split} split, calibrated, {block['n']} images)", "",
                  f"- balanced accuracy {block['balanced_accuracy']:.4f}{interval_text(ci.get('balanced_accuracy'))}"]
        if "malignant_auc" in block:
            lines.append(f"- malignant AUC {block['malignant_auc']:.4f}{interval_text(ci.get('malignant_auc'))}")
        if "at_operating_threshold" in block:
            op = block["at_operating_threshold"]
            lines.append(f"- at the threshold: sensitivity {op['sensitivity']:.3f}"
                         f"{interval_text(ci.get('sensitivity_at_threshold'))}, specificity "
                         f"{op['specificity']:.3f}{interval_text(ci.get('specificity_at_threshold'))}")
        if ci:
            lines.append(f"- [low, high]: {100 * ci['confidence']:.0f} % {ci['method']} ({ci['n_boot']} resamples, "
                         f"seed {ci['seed']})")
        break
    if report.get("threshold"):
        t = report["threshold"]
        lines += ["", f"Operating threshold {t['threshold']:.4f} on P(malignant), chosen on validation for "
                  f"sensitivity >= {t['target_sensitivity']}: sensitivity {t['sensitivity']:.3f}, "
                  f"specificity {t['specificity']:.3f}."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"


# --------------------------------------------------------------------------------------------------------------------
# Pixel-space SMOTE for small images, with a contact sheet of the synthetic samples


def pixel_smote(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    config: BalancingConfig | dict[str, Any] | None = None,
    split: str = "train",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Oversample the training images by interpolating raw pixels at `pixel_size` (<= 64 px); returns the manifest
    with the synthetic rows appended (split=train, source=synthetic) and a report; writes PNGs and a contact sheet."""
    from PIL import Image

    from pipelines.data import ImageDataset
    from pipelines.manifest import append_train_rows
    from pipelines.transforms import EvalTransform

    config = load_balancing_config(config)
    if config.space != "pixel":
        config = load_balancing_config({**config.model_dump(), "space": "pixel"})
    if split != "train":
        raise ValueError(f"refusing to resample split '{split}': resampling touches the training split only")
    size = config.pixel_size
    train = manifest[manifest.split == "train"]
    if train.empty:
        raise ValueError("manifest has no split=train rows to resample")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    class_names = sorted(train.label.unique())
    geometry = EvalTransform(size, [0.0] * 3, [1.0] * 3)
    dataset = ImageDataset(train, class_names, lambda im: im)
    from tqdm.auto import tqdm

    pixels = np.stack([np.asarray(geometry.resize_crop(dataset.image(i))).reshape(-1)
                       for i in tqdm(range(len(dataset)), desc="loading training images", leave=False)])
    resampler = FeatureResampler(config.method, config.target_ratio, config.k_neighbors, config.seed)
    new_x, new_y = resampler.fit_resample(pixels.astype(np.float32), train.label.to_numpy())
    synthetic_x, synthetic_y = new_x[len(pixels):], new_y[len(pixels):]
    rows = []
    for i, (flat, label) in enumerate(zip(synthetic_x, synthetic_y, strict=True)):
        image_id = f"pixsmote-{label}-{i:05d}"
        path = out_dir / "images" / f"{image_id}.png"
        Image.fromarray(np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(size, size, 3)).save(path)
        rows.append({"image_id": image_id, "path": str(path.resolve()), "label": str(label), "group": image_id,
                     "split": "train", "source": "synthetic"})
    added = pd.DataFrame(rows, columns=["image_id", "path", "label", "group", "split", "source"])
    if "malignant" in manifest.columns and len(added):
        malignant = set(manifest.loc[manifest.malignant.astype(str).isin(["1", "1.0", "True"]), "label"])
        added["malignant"] = added.label.isin(malignant).astype(int)
    result = append_train_rows(manifest, added)
    sheet = contact_sheet(added, out_dir / "contact_sheet.png", config.contact_sheet_per_class, size)
    report = {
        "method": config.method, "space": "pixel", "pixel_size": size, "target_ratio": config.target_ratio,
        "seed": config.seed, "synthetic_images": len(added), "contact_sheet": str(sheet) if sheet else None,
        "train_counts_before": _counts(train.label, class_names),
        "train_counts_after": _counts(result.label[result.split == "train"], class_names),
    }
    (out_dir / "pixel_smote.json").write_text(json.dumps(report, indent=2))
    log.info("pixel-space %s: %d synthetic %d px images in %s", config.method, len(added), size, out_dir / "images")
    return result, report


def contact_sheet(rows: pd.DataFrame, path: Path, per_class: int = 8, size: int = 32, scale: int = 2) -> Path | None:
    """A PNG grid: one row per class (its name on the left), up to `per_class` of its images, enlarged `scale` x."""
    from PIL import Image, ImageDraw

    if rows.empty:
        return None
    classes = sorted(rows.label.unique())
    cell, label_width, pad = size * scale, 70, 4
    sheet = Image.new("RGB", (label_width + per_class * (cell + pad) + pad, len(classes) * (cell + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(classes):
        top = pad + r * (cell + pad)
        draw.text((pad, top + cell // 2 - 6), name, fill="black")
        for c, file in enumerate(rows.path[rows.label == name].head(per_class)):
            image = Image.open(file).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(image, (label_width + pad + c * (cell + pad), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Run stage and CLI


def run_balancing_stage(
    config: RunConfig, run_dir: str | Path, manifest_path: str | Path | None = None
) -> dict[str, Any]:
    """`lesionlab run` stage: balance run_dir/bundle into run_dir/bundle_balanced (or write a pixel-SMOTE manifest)."""
    from pipelines.manifest import read_manifest, write_manifest

    settings = load_balancing_config(config.balancing)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path or run_dir / "manifest.csv")
    out = run_dir / "balancing"
    if settings.space == "pixel":
        manifest, report = pixel_smote(read_manifest(manifest_path), out / "pixel_smote", settings)
        # Not returned as "manifest": later stages keep the run's own manifest; retraining on this one is explicit.
        path = write_manifest(manifest, out / "manifest_pixel_smote.csv")
        return {"pixel_manifest": str(path), "contact_sheet": report["contact_sheet"],
                "report": str(out / "pixel_smote" / "pixel_smote.json")}
    bundle = run_dir / "bundle"
    if not (bundle / "card.json").is_file():
        raise FileNotFoundError(f"balancing needs the trained bundle '{bundle}'; the train stage did not write one")
    report = balance_bundle(bundle, manifest_path, run_dir / "bundle_balanced", settings,
                            config.training.target_sensitivity, out)
    return {"bundle": report["bundle"], "report": report["report"]}


def _cmd_balance(args: Any) -> None:
    from pipelines.manifest import read_manifest, write_manifest

    fields = {"method": args.method, "space": args.space, "target_ratio": args.ratio, "k_neighbors": args.k_neighbors,
              "seed": args.seed, "head_loss": args.head_loss, "class_weighting": args.class_weighting,
              "sampler": args.sampler, "head_epochs": args.head_epochs, "head_lr": args.head_lr,
              "head_init": args.head_init, "prior_correction": args.prior_correction,
              "target_sensitivity": args.target_sensitivity, "pixel_size": args.pixel_size,
              "bootstrap": args.bootstrap}
    settings = load_balancing_config({k: v for k, v in fields.items() if v is not None})
    out = Path(args.out)
    if settings.space == "pixel":
        manifest, report = pixel_smote(read_manifest(args.manifest), out, settings)
        path = write_manifest(manifest, Path(args.out_manifest or out / "manifest.csv"))
        print(f"{report['synthetic_images']} synthetic images; manifest -> {path}; contact sheet -> "
              f"{report['contact_sheet']}")
        return
    if not args.bundle:
        raise ValueError("--bundle is required for feature-space balancing (it re-trains that bundle's head)")
    report = balance_bundle(args.bundle, args.manifest, out, settings, report_dir=args.report_dir)
    val = report["metrics"]["val"]
    print(f"bundle: {report['bundle']}\nreport: {report['report']}\nvalidation balanced accuracy "
          f"{val['before']['balanced_accuracy']:.4f} -> {val['after']['balanced_accuracy']:.4f}")


def add_cli(subparsers: Any) -> None:
    """Register `lesionlab balance`."""
    p = subparsers.add_parser(
        "balance", help="feature-space SMOTE + head re-training on a bundle, or pixel-space SMOTE on a manifest")
    p.add_argument("--bundle", help="trained image bundle (feature space)")
    p.add_argument("--manifest", required=True, help="the manifest the bundle was trained on")
    p.add_argument("--out", required=True, help="balanced bundle folder (feature) or output folder (pixel)")
    p.add_argument("--method", choices=["none", *FEATURE_METHODS])
    p.add_argument("--space", choices=["feature", "pixel"])
    p.add_argument("--ratio", type=float, help="each class grows to this fraction of the largest (default 1.0)")
    p.add_argument("--k-neighbors", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--head-loss", choices=["ce", "focal", "logit-adjusted"])
    p.add_argument("--class-weighting", choices=["none", "inverse", "effective"])
    p.add_argument("--sampler", choices=["none", "balanced", "sqrt"])
    p.add_argument("--head-epochs", type=int)
    p.add_argument("--head-lr", type=float)
    p.add_argument("--head-init", choices=["reinit", "original"])
    p.add_argument("--prior-correction", action="store_const", const=True, help="bake bias -= tau log(prior) in")
    p.add_argument("--target-sensitivity", type=float, help="for the validation-chosen operating threshold")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples of the report's 95 %% intervals (default 1000; "
                   "0: none)")
    p.add_argument("--pixel-size", type=int, help=f"pixel space only, at most {MAX_PIXEL_SMOTE_SIZE} px")
    p.add_argument("--out-manifest", help="pixel space: manifest to write (default OUT/manifest.csv)")
    p.add_argument("--report-dir", help="feature space: report folder (default OUT/balancing_report)")
    p.set_defaults(func=_cmd_balance)
