"""ABCD dermoscopy descriptors: lesion mask, Asymmetry, Border irregularity, Colours, Diameter."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

# Reference sRGB values of the six dermoscopic colours, as used by the colour feature of dermoscopy CAD work
# (Seidenari et al.; Celebi et al. 2007): a lesion pixel takes the nearest one in CIELAB.
DERMOSCOPIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (197, 188, 217),
    "red": (118, 21, 17),
    "light brown": (163, 82, 16),
    "dark brown": (135, 44, 5),
    "blue-grey": (113, 108, 139),
    "black": (41, 31, 30),
}
WORKING_SIDE = 224  # descriptors are computed at this longest side; diameter is reported in input pixels
MIN_COLOUR_FRACTION = 0.05  # a colour counts when it covers at least 5 % of the lesion
MAX_COLOUR_DELTA_E = 45.0  # pixels farther than this from every reference colour count as none of them
ASYMMETRY_AXIS_THRESHOLD = 0.2  # an axis counts as asymmetric above this mirror mismatch


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(rgb.astype(np.float32) / 255.0)


_REFERENCE_LAB: np.ndarray | None = None


def _reference_lab() -> np.ndarray:
    global _REFERENCE_LAB
    if _REFERENCE_LAB is None:
        _REFERENCE_LAB = _lab(np.array([list(DERMOSCOPIC_COLOURS.values())], dtype=np.uint8))[0]
    return _REFERENCE_LAB


def lesion_mask(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Binary lesion mask of an RGB array: Otsu on the smoothed blue channel, morphology, the central component."""
    from skimage.filters import threshold_otsu

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB array, got shape {rgb.shape}")
    # Lesions are darker than skin and the blue channel separates pigment from skin best.
    channel = ndimage.gaussian_filter(rgb[..., 2].astype(np.float32), sigma=2.0)
    if float(channel.max() - channel.min()) < 1.0:
        return np.zeros(channel.shape, dtype=bool), float(channel.mean())
    threshold = float(threshold_otsu(channel))
    mask = channel <= threshold
    structure = np.ones((5, 5), dtype=bool)
    mask = ndimage.binary_opening(mask, structure=structure)
    mask = ndimage.binary_closing(mask, structure=structure)
    mask = ndimage.binary_fill_holes(mask)
    return _central_component(mask), threshold


def _central_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component, preferring ones that do not touch the frame (vignetting corners do)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = sizes.copy()
    inner[edge] = 0
    min_size = 0.01 * mask.size
    if inner.max() >= min_size:
        return labels == int(inner.argmax())
    # Every sizeable component touches the frame (large lesion or dark corners): keep the one nearest the centre.
    h, w = mask.shape
    best, best_score = 0, -np.inf
    for index in np.flatnonzero(sizes >= min(min_size, sizes.max())):
        ys, xs = np.nonzero(labels == index)
        distance = np.hypot(ys.mean() - h / 2, xs.mean() - w / 2) / np.hypot(h / 2, w / 2)
        score = sizes[index] / mask.size - distance
        if score > best_score:
            best, best_score = index, score
    return labels == best


def asymmetry(mask: np.ndarray) -> tuple[float, float]:
    """Mirror mismatch (1 - IoU of mask and its reflection) about the major and the minor principal axis."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 0.0, 0.0
    cy, cx = ys.mean(), xs.mean()
    coords = np.stack([ys - cy, xs - cx])
    eigvals, eigvecs = np.linalg.eigh(np.cov(coords))
    major = eigvecs[:, np.argmax(eigvals)]  # (dy, dx)
    angle = np.degrees(np.arctan2(major[0], major[1]))
    # Centre the lesion in a padded square, rotate the major axis onto the horizontal, then mirror.
    half = int(np.ceil(np.hypot(*mask.shape) / 2)) + 2
    canvas = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    canvas[np.round(ys - cy).astype(int) + half, np.round(xs - cx).astype(int) + half] = 1.0
    aligned = ndimage.rotate(canvas, angle, reshape=False, order=1) > 0.5
    if not aligned.any():
        return 0.0, 0.0
    scores = []
    for mirrored in (aligned[::-1, :], aligned[:, ::-1]):  # about the major axis, then about the minor axis
        union = np.logical_or(aligned, mirrored).sum()
        scores.append(float(1.0 - np.logical_and(aligned, mirrored).sum() / union))
    return scores[0], scores[1]


def border_irregularity(mask: np.ndarray) -> tuple[float, float]:
    """(irregularity in [0, 1), compactness P^2 / 4 pi A >= ~1): a disc gives about (0, 1), a ragged star far more."""
    from skimage.measure import perimeter

    area = float(mask.sum())
    if area < 3:
        return 0.0, 1.0
    # Crofton perimeter is close to the Euclidean length of a digital curve at any orientation.
    length = float(perimeter(mask, neighborhood=4)) if area < 64 else _crofton(mask)
    compactness = length**2 / (4 * np.pi * area)
    return float(max(0.0, 1.0 - 1.0 / max(compactness, 1e-9))), float(compactness)


def _crofton(mask: np.ndarray) -> float:
    from skimage.measure import perimeter_crofton

    return float(perimeter_crofton(mask, directions=4))


def colours(rgb: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Fraction of the lesion's pixels nearest to each of the six dermoscopic colours (in CIELAB)."""
    if not mask.any():
        return {name: 0.0 for name in DERMOSCOPIC_COLOURS}
    pixels = _lab(rgb[mask][None])[0]
    distances = np.linalg.norm(pixels[:, None, :] - _reference_lab()[None], axis=2)
    nearest = distances.argmin(axis=1)
    counted = distances.min(axis=1) <= MAX_COLOUR_DELTA_E
    fractions = np.bincount(nearest[counted], minlength=len(DERMOSCOPIC_COLOURS)) / len(pixels)
    return {name: float(f) for name, f in zip(DERMOSCOPIC_COLOURS, fractions, strict=True)}


def max_diameter(mask: np.ndarray) -> float:
    """Largest Feret diameter of the mask in its own pixels (farthest pair of convex-hull points)."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    # Pixel corners, so a single pixel has diameter sqrt(2) and a w-wide bar has at least w.
    points = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)]).astype(float)
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:
        pass
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def mask_descriptors(mask: np.ndarray) -> dict[str, Any]:
    """Shape descriptors (asymmetry, border, diameter) of a binary mask, for masks from any segmenter."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D binary mask, got shape {mask.shape}")
    major, minor = asymmetry(mask)
    irregularity, compactness = border_irregularity(mask)
    return {
        "asymmetry": (major + minor) / 2,
        "asymmetry_axes": [major, minor],
        "asymmetric_axes": int(sum(score > ASYMMETRY_AXIS_THRESHOLD for score in (major, minor))),
        "border_irregularity": irregularity,
        "compactness": compactness,
        "diameter_px": max_diameter(mask),
        "area_fraction": float(mask.mean()),
    }


def abcd_descriptors(image: Image.Image) -> dict[str, Any]:
    """ABCD descriptors of a dermoscopy image, plus the lesion `mask` (bool, image size) for drawing."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    width, height = image.size
    scale = min(1.0, WORKING_SIDE / max(width, height))
    small = image if scale == 1.0 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    rgb = np.asarray(small)
    mask, threshold = lesion_mask(rgb)
    found = bool(mask.sum() >= 0.001 * mask.size and mask.sum() >= 4)
    if not found:
        mask = np.zeros_like(mask)
    shape = mask_descriptors(mask)
    fractions = colours(rgb, mask)
    present = [name for name, f in fractions.items() if f >= MIN_COLOUR_FRACTION]
    full_mask = mask
    if scale != 1.0:
        full_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
    return {
        **shape,
        "diameter_px": shape["diameter_px"] / scale,
        "lesion_found": found,
        "colours": present,
        "colour_count": len(present),
        "colour_fractions": fractions,
        "threshold": threshold,
        "mask": full_mask,
    }
