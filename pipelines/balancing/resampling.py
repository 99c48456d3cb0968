"""Feature-space oversampling with imbalanced-learn's SMOTE family, and the guard that keeps it on the training split.

References:
    Chawla, Bowyer, Hall, Kegelmeyer. SMOTE: Synthetic Minority Over-sampling Technique. JAIR 16, 2002.
    Han, Wang, Mao. Borderline-SMOTE: A New Over-Sampling Method in Imbalanced Data Sets Learning. ICIC 2005.
    He, Bai, Garcia, Li. ADASYN: Adaptive Synthetic Sampling Approach for Imbalanced Learning. IJCNN 2008.
    Batista, Prati, Monard. A Study of the Behavior of Several Methods for Balancing Machine Learning Training Data.
    SIGKDD Explorations 6(1), 2004 (SMOTE followed by Tomek-link cleaning).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FEATURE_METHODS", "FeatureResampler", "oversample_split", "target_counts"]

log = logging.getLogger(__name__)

FEATURE_METHODS = ("smote", "borderline-smote", "adasyn", "smote-tomek")


def target_counts(counts: dict[Any, int], target_ratio: float = 1.0) -> dict[Any, int]:
    """Per-class sizes after oversampling: max(n_c, ceil(ratio * n_max)); no class shrinks."""
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    largest = max(counts.values())
    return {label: max(int(n), int(math.ceil(target_ratio * largest))) for label, n in counts.items()}


class FeatureResampler:
    """An imbalanced-learn SMOTE-family sampler by name; `fit_resample(X, y)` returns the resampled training set.

    Args:
        method: smote, borderline-smote, adasyn or smote-tomek.
        target_ratio: every class grows to at least this fraction of the largest (see `target_counts`).
        k_neighbors: neighbours interpolated between (lowered, with a warning, for a class with fewer samples).
        seed: random state of the sampler.
    """

    def __init__(self, method: str = "smote", target_ratio: float = 1.0, k_neighbors: int = 5, seed: int = 0) -> None:
        self.method = method
        self.target_ratio = target_ratio
        self.k_neighbors = k_neighbors
        self.seed = seed

    def _sampler(self, y: np.ndarray) -> Any:
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
    # A resampled row whose bytes equal an unused input row is that row; every other one is synthetic.
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
