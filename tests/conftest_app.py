"""Fixtures for the app tests: small model bundles with realistic cards, built once per session (no downloads)."""

from __future__ import annotations

import contextlib
import os
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
    """Save a seeded random classifier as a bundle whose probabilities differ clearly between sample images.

    BatchNorm statistics are re-estimated on a few sample images and the head is scaled to the embedding's spread,
    so a wrong preprocessing step (orientation, colour conversion, crop) changes the probabilities visibly.
    """
    from PIL import Image

    from pipelines.transforms import eval_transform

    torch.manual_seed(seed)
    model = build_model(name, num_classes=len(HAM_CLASSES), img_size=size, **kwargs)
    card = realistic_card(name, size, **kwargs)
    norm = card["normalization"]
    transform = eval_transform(size, norm["mean"], norm["std"])
    files = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:16]
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration passes
        model(batch)
        model.eval()
        embeddings = model.forward_features(batch)
        spread = embeddings.std(0).clamp_min(1e-6)
        weight = torch.randn(len(HAM_CLASSES), embeddings.shape[1]) / spread / embeddings.shape[1] ** 0.5 * 1.5
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-(weight @ embeddings.mean(0)))
    return save_bundle(folder, model, card)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder with two image bundles: EfficientNet-Lite0 (64 px, the default kind) and a small CNN."""
    root = tmp_path_factory.mktemp("models")
    make_bundle(root / "lite0", "efficientnet-lite0", 64)
    make_bundle(root / "cnn", "small-cnn", 64, widths=[8, 16, 32])
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(models: Path, gradio_tmp: Path, **settings):
    """`start_server` for a fixture: yields (demo, url), then closes the app and restores GRADIO_TEMP_DIR."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    demo, url = start_server(models, gradio_tmp, **settings)
    try:
        yield demo, url
    finally:
        demo.close()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def start_server(models: Path, gradio_tmp: Path, **settings):
    """Build and launch the app on 127.0.0.1 in this process (non-blocking); returns (demo, url)."""
    import os

    os.environ["GRADIO_TEMP_DIR"] = str(gradio_tmp)  # uploads land in the test's own folder
    from app.layout import build_app
    from app.server import launch
    from app.settings import ServeSettings

    options = ServeSettings(**settings)
    demo = build_app(models, options)
    port = free_port()
    launch(demo, "127.0.0.1", port, options, block=False)
    return demo, f"http://127.0.0.1:{port}/"
