"""The heat-map points at the evidence: a pointing game on a learnt toy task, and the shipped bundle on real lesions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.bundle import load_bundle, save_bundle
from models.registry import build_model

ROOT = Path(__file__).resolve().parent.parent
SIZE, PATCH = 48, 12
TOLERANCE = 4  # one cell of the 12 x 12 feature map; the pointing game (Zhang et al. 2016) allows 15 px at 224 px


def _patch_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Dark textured backgrounds; half carry a bright square at a random place (label 1)."""
    images = rng.uniform(0.0, 0.45, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.arange(n) % 2
    corners = []
    for i in range(n):
        y, x = (int(v) for v in rng.integers(0, SIZE - PATCH + 1, size=2))
        corners.append((y, x))
        if labels[i]:
            images[i, y:y + PATCH, x:x + PATCH] = rng.uniform(0.85, 1.0, size=3)
    return images, labels, corners


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory) -> Path:
    """A small CNN trained to say whether a bright patch is in the image, saved as a bundle."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, labels, _ = _patch_images(512, rng)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels)
    model = build_model("small-cnn", num_classes=2, img_size=SIZE, widths=[8, 16])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for batch in torch.randperm(len(x)).split(32):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    card = {
        "architecture": {"name": "small-cnn", "kwargs": {"widths": [8, 16]}},
        "class_names": ["plain", "patch"],
        "malignant_classes": ["patch"],
        "input_size": SIZE,
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "task": "image",
    }
    return save_bundle(tmp_path_factory.mktemp("patch") / "bundle", model, card)


def test_gradcam_wins_the_pointing_game_on_a_learnt_patch(patch_bundle):
    from app.explain import Explainer

    explainer = Explainer(load_bundle(patch_bundle))
    images, labels, corners = _patch_images(60, np.random.default_rng(1))
    hits = 0
    shown = 0
    for image, label, (y, x) in zip(images, labels, corners):
        if not label:
            continue
        shown += 1
        heat = explainer.explain(Image.fromarray((image * 255).astype(np.uint8)), class_index=1).heatmap
        peak_y, peak_x = np.unravel_index(int(heat.argmax()), heat.shape)
        hits += int(y - TOLERANCE <= peak_y < y + PATCH + TOLERANCE and x - TOLERANCE <= peak_x < x + PATCH + TOLERANCE)
        # ...and most of the heat lies on the patch, not spread over the image.
        assert heat[y:y + PATCH, x:x + PATCH].mean() > 2 * heat.mean()
    assert shown == 30
    assert hits / shown >= 0.9, f"the heat-map's maximum fell inside the patch in {hits} of {shown} images"


def test_heatmap_is_larger_on_the_lesion_than_around_it_with_the_default_bundle():
    from app.explain import Explainer
    from pipelines.abcd import abcd_descriptors

    bundle = load_bundle(ROOT / "models" / "default_bundle")
    explainer = Explainer(bundle)
    rows = list(csv.DictReader((ROOT / "data" / "ham10000_sample" / "metadata.csv").open()))[:16]
    inside_wins = 0
    counted = 0
    for row in rows:
        image = Image.open(ROOT / "data" / "ham10000_sample" / "images" / f"{row['image_id']}.jpg").convert("RGB")
        explanation = explainer.explain(image, class_index=bundle.class_names.index(row["dx"]))
        mask = np.asarray(abcd_descriptors(explanation.crop)["mask"], dtype=bool)
        if not mask.any() or mask.all():
            continue
        counted += 1
        inside_wins += int(explanation.heatmap[mask].mean() > explanation.heatmap[~mask].mean())
    assert counted >= 12
    assert inside_wins / counted >= 0.75, f"heat inside the lesion mask won in {inside_wins} of {counted} images"


def test_gradcam_reads_the_activated_feature_map():
    from app.explain import gradcam_target_layer
    from models.classifier import FeatureMap

    for name, kwargs in (("efficientnet-lite0", {}), ("small-cnn", {"widths": [8, 16]})):
        model = build_model(name, num_classes=3, img_size=64, **kwargs)
        target = dict(model.named_modules())[gradcam_target_layer(model)]
        assert isinstance(target, FeatureMap)
