"""ABCD descriptors and DermaFlux-style captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.abcd import DERMOSCOPIC_COLOURS, abcd_descriptors, mask_descriptors
from pipelines.captions import caption_from_descriptors, caption_manifest

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ham10000_sample"


def _polar(size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] - size / 2
    return np.hypot(yy, xx), np.arctan2(yy, xx)


def circle_mask(radius: float = 45) -> np.ndarray:
    r, _ = _polar()
    return r < radius


def irregular_star_mask(seed: int = 0, spikes: int = 7) -> np.ndarray:
    """A star whose spikes have random lengths: no mirror symmetry, a long ragged border."""
    r, theta = _polar()
    lengths = np.random.default_rng(seed).uniform(0.4, 1.0, spikes)
    sector = 2 * np.pi / spikes
    index = ((theta + np.pi) // sector).astype(int) % spikes
    phase = ((theta + np.pi) % sector) / sector
    return r < 15 + 55 * lengths[index] * (1 - np.abs(2 * phase - 1))


def test_circle_is_symmetric_with_low_border_index() -> None:
    d = mask_descriptors(circle_mask(45))
    assert d["asymmetry"] < 0.03
    assert d["asymmetric_axes"] == 0
    assert d["border_irregularity"] < 0.05
    assert d["diameter_px"] == pytest.approx(90, abs=3)


def test_irregular_star_is_asymmetric_with_high_border_index() -> None:
    star, circle = mask_descriptors(irregular_star_mask()), mask_descriptors(circle_mask())
    assert star["asymmetry"] > 0.15
    assert star["asymmetric_axes"] >= 1
    assert star["border_irregularity"] > 0.5
    assert star["border_irregularity"] > circle["border_irregularity"] + 0.4


def test_dark_disc_on_skin_is_segmented_and_measured() -> None:
    rgb = np.full((200, 260, 3), (225, 180, 160), dtype=np.uint8)
    yy, xx = np.mgrid[:200, :260]
    disc = (yy - 100) ** 2 + (xx - 130) ** 2 < 50**2
    rgb[disc] = DERMOSCOPIC_COLOURS["dark brown"]
    d = abcd_descriptors(Image.fromarray(rgb))
    assert d["mask"].shape == (200, 260)
    iou = (d["mask"] & disc).sum() / (d["mask"] | disc).sum()
    assert iou > 0.9
    assert d["colours"] == ["dark brown"]
    assert d["diameter_px"] == pytest.approx(100, abs=5)


def test_descriptors_on_real_sample_images_are_finite_and_in_range() -> None:
    paths = sorted((SAMPLE / "images").glob("*.jpg"))[:12]
    for path in paths:
        image = Image.open(path).convert("RGB")
        d = abcd_descriptors(image)
        assert d["lesion_found"], path.name
        assert d["mask"].shape == (image.height, image.width)
        for key in ("asymmetry", "border_irregularity", "diameter_px", "area_fraction"):
            assert np.isfinite(d[key]), (path.name, key)
        assert 0 <= d["asymmetry"] <= 1 and 0 <= d["border_irregularity"] < 1
        assert 0 < d["diameter_px"] <= np.hypot(image.width, image.height) + 2
        assert 0 <= d["colour_count"] <= 6 and set(d["colours"]) <= set(DERMOSCOPIC_COLOURS)
        assert sum(d["colour_fractions"].values()) <= 1 + 1e-6


def test_caption_states_the_descriptors_and_metadata() -> None:
    d = {**mask_descriptors(irregular_star_mask()), "colours": ["light brown", "blue-grey"], "lesion_found": True}
    meta = {"label": "mel", "age": 55.0, "sex": "male", "localization": "back"}
    caption = caption_from_descriptors(d, meta, malignant=True)
    assert caption.startswith("This photo depicts a malignant lesion.")
    assert "melanoma" in caption and "back" in caption and "55-year-old male" in caption
    assert f"asymmetry index {d['asymmetry']:.2f}" in caption
    assert f"irregularity index {d['border_irregularity']:.2f}" in caption
    assert "2 of the six dermoscopic colours: light brown and blue-grey" in caption
    assert f"{d['diameter_px']:.0f} px" in caption
    benign = caption_from_descriptors(mask_descriptors(circle_mask()) | {"colours": []}, {"label": "nv"}, False)
    assert benign.startswith("This photo depicts a benign lesion.") and "symmetric about both" in benign


def test_caption_manifest_fills_only_the_requested_splits(tmp_path: Path) -> None:
    meta = pd.read_csv(SAMPLE / "metadata.csv").head(6)
    manifest = pd.DataFrame(
        {
            "image_id": meta.image_id,
            "path": [str(SAMPLE / "images" / f"{i}.jpg") for i in meta.image_id],
            "label": meta.dx,
            "group": meta.lesion_id,
            "split": ["train", "train", "train", "val", "test", "train"],
            "source": "real",
            "malignant": meta.malignant,
            "age": meta.age,
            "sex": meta.sex,
            "localization": meta.localization,
        }
    )
    out = caption_manifest(manifest, splits=["train"])
    train = out[out.split == "train"]
    assert (train.caption.str.startswith("This photo depicts a")).all()
    assert (out[out.split != "train"].caption == "").all()
    assert train.abcd_asymmetry.astype(float).between(0, 1).all()
    first = train.iloc[0]
    assert f"{float(first.abcd_asymmetry):.2f}" in first.caption
    assert ("malignant" in first.caption) == bool(first.malignant)


def test_caption_cli_writes_a_captioned_manifest(tmp_path: Path) -> None:
    from pipelines.cli import main
    from pipelines.manifest import ingest_ham10000, read_manifest, write_manifest

    manifest = ingest_ham10000(SAMPLE).head(4).assign(split="train")
    write_manifest(manifest, tmp_path / "in.csv")
    assert main(["caption", "--manifest", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv")]) == 0
    out = read_manifest(tmp_path / "out.csv")
    assert len(out) == 4 and out.caption.str.contains("dermoscopic colour|none of the six").all()
