"""Distances between a synthetic and a real image set in a feature space, as pure numpy functions of (N, D) arrays:
the kernel inception distance with its standard error (Bińkowski et al. 2018), precision / recall (Kynkäänniemi et
al. 2019) and density / coverage (Naeem et al. 2020) from k-nearest-neighbour balls, and each synthetic image's
cosine similarity to its nearest real image (Somepalli et al. 2023). Distance matrices are computed in chunks.

References:
    Bińkowski, Sutherland, Arbel, Gretton. Demystifying MMD GANs. ICLR 2018 (KID: unbiased MMD² with the cubic
    polynomial kernel, eq. 5, averaged over subsets).
    Kynkäänniemi, Karras, Laine, Lehtinen, Aila. Improved Precision and Recall Metric for Assessing Generative
    Models. NeurIPS 2019 (manifolds as unions of k-NN balls, eqs. 1-3).
    Naeem, Oh, Uh, Choi, Yoo. Reliable Fidelity and Diversity Metrics for Generative Models. ICML 2020 (density and
    coverage, eqs. 3 and 4).
    Somepalli, Singla, Goldblum, Geiping, Goldstein. Diffusion Art or Digital Forgery? Investigating Data Replication
    in Diffusion Models. CVPR 2023 (nearest-training-neighbour similarity as a replication score).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "CHUNK_ELEMENTS",
    "kid",
    "kth_neighbour_distance",
    "mmd2_unbiased",
    "nearest_neighbour_similarity",
    "polynomial_kernel",
    "prdc",
]

CHUNK_ELEMENTS = 1 << 22  # distance-matrix entries computed at once (32 MiB of float64)


def _feature_arrays(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64 (N, D) arrays of the same width."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"feature arrays of shapes {real.shape} (real) and {synthetic.shape} (synthetic); expected "
                         "(images, features) with the same number of features")
    return real, synthetic


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, M) cubic polynomial kernel k(x, y) = (x·y / d + 1)^3 of Bińkowski et al. 2018 (d: feature width)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Unbiased estimate of MMD² with the cubic polynomial kernel (Bińkowski et al. 2018, eq. 5; Gretton et al.
    2012, eq. 3): within-set means exclude the diagonal, so sets of unequal size are allowed; each needs 2 images."""
    m, n = len(real), len(synthetic)
    if m < 2 or n < 2:
        raise ValueError(f"MMD² needs at least 2 images in each set; got {m} real and {n} synthetic")
    k_xx, k_yy = polynomial_kernel(real, real), polynomial_kernel(synthetic, synthetic)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * polynomial_kernel(real, synthetic).mean())


def kid(real: np.ndarray, synthetic: np.ndarray, n_subsets: int = 10, subset_size: int = 1000,
        seed: int = 0) -> dict[str, Any]:
    """Kernel inception distance (Bińkowski et al. 2018): the mean of `mmd2_unbiased` over subsets, with its
    standard error.

    Each set is shuffled and cut into the same number of disjoint subsets (at most `n_subsets`, at least 2, each at
    most `subset_size` images), and subset i of the real images is compared with subset i of the synthetic ones. The
    reference code draws overlapping subsets and reports their spread; disjoint subsets give independent estimates,
    so std / sqrt(subsets) is an honest standard error of the mean. Needs at least 4 images in each set.
    """
    real, synthetic = _feature_arrays(real, synthetic)
    if n_subsets < 2 or subset_size < 2:
        raise ValueError(f"KID with {n_subsets} subsets of {subset_size} images; expected at least 2 subsets of at "
                         "least 2 images (the standard error needs two independent estimates)")
    n_real, n_synthetic = len(real), len(synthetic)
    if min(n_real, n_synthetic) < 4:
        raise ValueError(f"KID needs at least 4 images in each set (2 subsets of 2); got {n_real} real and "
                         f"{n_synthetic} synthetic")
    subsets = min(n_subsets, n_real // 2, n_synthetic // 2)
    size_real, size_synthetic = min(subset_size, n_real // subsets), min(subset_size, n_synthetic // subsets)
    rng = np.random.default_rng(seed)
    order_real, order_synthetic = rng.permutation(n_real), rng.permutation(n_synthetic)
    values = np.array([
        mmd2_unbiased(real[order_real[i * size_real:(i + 1) * size_real]],
                      synthetic[order_synthetic[i * size_synthetic:(i + 1) * size_synthetic]])
        for i in range(subsets)
    ])
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / math.sqrt(subsets)),
            "subsets": int(subsets), "subset_size_real": int(size_real), "subset_size_synthetic": int(size_synthetic)}


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) Euclidean distances."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(squared, 0.0, None))


def _rows_per_chunk(columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, columns))


def kth_neighbour_distance(features: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance of each point to its k-th nearest other point of the same set (the k-NN ball's radius)."""
    features = np.asarray(features, dtype=np.float64)
    step = _rows_per_chunk(len(features))
    radii = [np.partition(_distances(features[i:i + step], features), k, axis=1)[:, k]  # column 0 is the point itself
             for i in range(0, len(features), step)]
    return np.concatenate(radii)


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020) with k-NN balls.

    precision: share of synthetic images inside some real image's ball (its radius: distance to its k-th nearest
    real image); recall: share of real images inside some synthetic image's ball; density: how many real balls hold
    each synthetic image, divided by k (about 1 when the two sets are alike; above 1 when synthetic images crowd
    around dense real regions); coverage: share of real images whose ball holds a synthetic image. Strict `<` as in
    the authors' code. Each set needs more than k images.
    """
    real, synthetic = _feature_arrays(real, synthetic)
    if k < 1 or len(real) <= k or len(synthetic) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than k images in each set and k >= 1; got "
                         f"{len(real)} real and {len(synthetic)} synthetic")
    real_radii, synthetic_radii = kth_neighbour_distance(real, k), kth_neighbour_distance(synthetic, k)
    in_some_real_ball = np.zeros(len(synthetic), bool)
    real_balls_holding = np.zeros(len(synthetic), np.int64)
    recalled, covered = np.zeros(len(real), bool), np.zeros(len(real), bool)
    step = _rows_per_chunk(len(synthetic))
    for start in range(0, len(real), step):
        distances = _distances(real[start:start + step], synthetic)  # (chunk of real, all synthetic)
        radii = real_radii[start:start + step, None]
        inside = distances < radii
        in_some_real_ball |= inside.any(axis=0)
        real_balls_holding += inside.sum(axis=0)
        recalled[start:start + step] = (distances < synthetic_radii[None, :]).any(axis=1)
        covered[start:start + step] = distances.min(axis=1) < radii[:, 0]
    return {"precision": float(in_some_real_ball.mean()), "recall": float(recalled.mean()),
            "density": float(real_balls_holding.sum() / (k * len(synthetic))), "coverage": float(covered.mean())}


def nearest_neighbour_similarity(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((N,) highest cosine similarity of each query to the references, (N,) index of that reference): a synthetic
    image's similarity to its nearest real training image, the replication score of Somepalli et al. 2023."""
    references, queries = _feature_arrays(references, queries)
    if not len(references):
        raise ValueError("the nearest-neighbour search needs at least one reference image")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    queries, references = unit(queries), unit(references)
    step = _rows_per_chunk(len(references))
    similarity, index = np.zeros(len(queries)), np.zeros(len(queries), np.int64)
    for start in range(0, len(queries), step):
        cosine = queries[start:start + step] @ references.T
        index[start:start + step] = cosine.argmax(axis=1)
        similarity[start:start + step] = cosine.max(axis=1)
    return np.clip(similarity, -1.0, 1.0), index
