"""Fixtures for the app tests: small model bundles with realistic cards, built once per session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.bundle import save_bundle
from models.registry import build_model, default_normalization

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "data" / "ham10000_sample" / "images"
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def realistic_card(name: str, size: int, **kwargs) -> dict:
    """A card like the trainer writes: classes, malignant classes, threshold with its validation metrics."""
    return {
        "architecture": {"name": name, "kwargs": kwargs},
        "class_names": HAM_CLASSES,
        "malignant_classes": ["mel", "bcc", "akiec"],
        "input_size": size,
        "normalization": default_normalization(name),
        "operating_threshold": 0.3,
        "threshold_metrics": {"sensitivity": 0.9, "specificity": 0.62, "threshold": 0.3, "target_sensitivity": 0.9},
        "metrics": {
            "validation": {"n": 143, "balanced_accuracy": 0.61, "macro_auc": 0.88, "malignant_auc": 0.85},
            "test": {"n": 143, "balanced_accuracy": 0.58, "macro_auc": 0.86, "malignant_auc": 0.83},
        },
        "training": {"data": "data/ham10000_sample", "loss": "ce", "class_weighting": "effective",
                     "sampler": "none", "train_counts": {c: {"real": 10, "synthetic": 0} for c in HAM_CLASSES}},
        "task": "image",
    }


def make_bundle(folder: Path, name: str, size: int, seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised (seeded) classifier as a bundle; the head is scaled so classes differ."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=len(HAM_CLASSES), img_size=size, **kwargs).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # spread the probabilities so a wrong preprocessing step would show
    return save_bundle(folder, model, realistic_card(name, size, **kwargs))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder with two image bundles: EfficientNet-Lite0 (64 px, the default kind) and a small CNN."""
    root = tmp_path_factory.mktemp("models")
    make_bundle(root / "lite0", "efficientnet-lite0", 64)
    make_bundle(root / "cnn", "small-cnn", 64, widths=[8, 16, 32])
    return root
