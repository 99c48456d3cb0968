"""The Pathology tab: the shipped MIL bundle, the server's file limits, bounded tiling, messages without server
paths, referral wording that cannot contradict itself, the H&E check, and whole-slide files through OpenSlide."""

from __future__ import annotations

import json
import re
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.pathology import MAX_CASE_PATCHES, MIN_BLUE_EXCESS, analyze_slide, blue_excess, load_case, public_message
from app.wording import pathology_card_markdown, pathology_referral_html
from pipelines.bags import load_bag, tile_image, tissue_mask
from pipelines.config import TilingSettings
from pipelines.images import ImageError, ImageLimits

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "pathology_bundle"
RECORD = ROOT / "benchmarks" / "results" / "pathology_bundle" / "ship.json"
UCSB = ROOT / "data" / "ucsb_breast_sample" / "images"
SLIDES = sorted(UCSB.glob("*.jpg"))
HAM = sorted((ROOT / "data" / "ham10000_sample" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def bundle():
    from models.bundle import load_bundle

    return load_bundle(BUNDLE)


def _big_slide(tmp_path: Path, reps: tuple[int, int] = (2, 2), name: str = "big_case.png") -> Path:
    """A real H&E image tiled `reps` times (2 x 2: 1792 x 1536 px, 2.75 MP), saved losslessly."""
    rgb = np.tile(np.asarray(Image.open(SLIDES[0]).convert("RGB")), (*reps, 1))
    path = tmp_path / name
    Image.fromarray(rgb).save(path)
    return path


# ------------------------------------------------------------------------------------------ the shipped bundle


def test_shipped_bundle_card_is_clinical_and_has_no_paths(bundle):
    card = json.loads((BUNDLE / "card.json").read_text())
    assert card["task"] == "mil" and card["class_names"] == ["benign", "malignant"]
    for key in ("description", "data_source", "data_license", "data_attribution", "intended_use", "limitations",
                "model_version", "date", "data_counts"):
        assert card.get(key), f"card lacks {key}"
    assert "Gelasca" in card["data_attribution"] and "research use" in card["data_license"]
    assert card["data_counts"]["images"] == 58 and sum(card["data_counts"]["train"].values()) >= 30
    assert card["metrics"]["test"]["n"] == 10 and card["metrics"]["validation"]["n"] == 12
    assert "Research use only" in card["intended_use"]
    text = json.dumps(card)
    assert not re.search(r"(/work|/tmp|/home|runs/|shared/|[A-Za-z]:\\\\)", text), "a file path is on the card"
    attribution = (BUNDLE / "ATTRIBUTION.md").read_text()
    assert "Gelasca" in attribution and "ICIP 2008" in attribution
    size = sum(p.stat().st_size for p in BUNDLE.iterdir())
    assert size < 8 * 2**20, f"the pathology bundle is {size / 2**20:.1f} MB"
    shown = pathology_card_markdown("pathology_bundle", card)
    assert "validation images" in shown and "Research use only" in shown and "/" not in shown.replace("n/a", "")


def test_shipped_bundle_reproduces_its_record(bundle):
    """The sample images that were validation/test slides get the probabilities the record measured."""
    from pipelines.mil import predict_slides

    rows = {row["image"]: row for row in json.loads(RECORD.read_text())["rows"]}
    scored = [p for p in SLIDES if p.name in rows]
    assert scored, "no sample image is among the recorded validation/test slides"
    table = predict_slides(bundle, scored)
    for path, p, n in zip(scored, table.prob_malignant, table.n_patches):
        assert p == pytest.approx(rows[path.name]["p_malignant"], abs=1e-5)
        assert n == rows[path.name]["n_patches"]


def test_serve_default_models_folder_has_both_bundles_and_packages_them():
    from app.layout import build_app
    from app.service import discover_bundles, health
    from app.settings import ServeSettings
    from pipelines.cli import build_parser, default_bundle_path

    folder = Path(build_parser().parse_args(["serve"]).models)
    assert folder == default_bundle_path().parent and (folder / "__init__.py").is_file()
    assert {"default_bundle", "pathology_bundle"} <= set(discover_bundles(folder))
    demo = build_app(folder, ServeSettings())  # what `lesionlab serve` builds on a fresh clone
    status = health(demo.lesionlab_service)
    assert "default_bundle" in status["models"] and status["pathology_models"] == ["pathology_bundle"]
    assert "predict_slide" in {fn.api_name for fn in demo.fns.values()}
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "pathology_bundle/*" in package_data["models"] and "default_bundle/*" in package_data["models"]


# ------------------------------------------------------------------------------------------ bounded tiling


def test_tissue_mask_in_blocks_equals_the_whole_image_computation(monkeypatch):
    from skimage.filters import threshold_otsu

    import pipelines.bags as bags

    rgb = np.asarray(Image.open(SLIDES[1]).convert("RGB"))
    data = rgb.astype(np.float32) / 255.0
    high, low = data.max(axis=2), data.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    expected = (saturation > np.clip(threshold_otsu(saturation), 0.04, 0.15)) & (high > 0.1)
    monkeypatch.setattr(bags, "MASK_BLOCK_ROWS", 100)  # 768 rows: 8 blocks, the last one short
    assert np.array_equal(tissue_mask(rgb), expected)
    # grid fractions with overlap (stride 64) equal a direct count per cell
    bag = tile_image(Image.fromarray(rgb), TilingSettings(patch_size=128, stride=64, min_tissue=0.0))
    for (x, y), fraction in list(zip(bag.coords, bag.tissue_fraction))[::7]:
        assert fraction == pytest.approx(expected[y : y + 128, x : x + 128].mean())


def test_patch_cap_draws_a_fixed_sample_over_the_whole_tissue(tmp_path, bundle):
    big = _big_slide(tmp_path, (3, 3))  # 2688 x 2304 px, about 300 tissue patches
    first = analyze_slide(bundle, [big], max_patches=40, limits=ImageLimits(max_pixels=10_000_000))
    again = analyze_slide(bundle, [big], max_patches=40, limits=ImageLimits(max_pixels=10_000_000))
    assert first.n_patches == 40 and first.n_tissue_patches > 200
    assert first.probabilities == again.probabilities  # the sample is deterministic
    assert any("fixed random sample of 40" in w for w in first.warnings)
    bag = load_case(bundle, [big], ImageLimits(max_pixels=10_000_000), max_patches=40)
    # spread over the image: patches in every third of it, both ways
    assert len({int(x) * 3 // 2688 for x in bag.coords[:, 0]}) == 3
    assert len({int(y) * 3 // 2304 for y in bag.coords[:, 1]}) == 3
    # the heat-map is drawn on an overview at most 2048 px long, with the patches at their scaled place
    assert max(first.heatmap.size) == 2048 and bag.thumbnail_scale == pytest.approx(2048 / 2688, abs=1e-3)


def test_case_of_patches_is_bounded_by_count_and_by_pixels_together(bundle, tmp_path):
    patch_files = []
    for i in range(4):
        path = tmp_path / f"case_x{i * 128}_y0.png"
        Image.open(SLIDES[0]).convert("RGB").crop((i * 128, 0, i * 128 + 128, 128)).save(path)
        patch_files.append(path)
    result = analyze_slide(bundle, patch_files)
    assert result.n_patches == 4 and any("Only 4 tissue patches" in w for w in result.warnings)
    with pytest.raises(ImageError, match="4 patch images were given; a case may have at most 3"):
        load_case(bundle, patch_files, max_patches=3)
    with pytest.raises(ImageError, match=r"hold 0\.1 MP together; a case may hold at most 0\.05 MP"):
        load_case(bundle, patch_files, ImageLimits(max_pixels=50_000))
    # a name with huge coordinates cannot blow the overview up: it is scaled into 2048 px
    far = tmp_path / "case_x900000_y900000.png"
    Image.open(patch_files[0]).save(far)
    bag = load_case(bundle, [*patch_files, far])
    assert max(bag.thumbnail.size) <= 2048


# ------------------------------------------------------------------------------------------ referral wording


def _card(threshold: float) -> dict:
    return {"malignant_classes": ["malignant"], "operating_threshold": threshold,
            "threshold_metrics": {"sensitivity": 1.0, "specificity": 0.8}, "metrics": {"validation": {"n": 12}}}


def _shown(text: str) -> tuple[float, float]:
    match = re.search(r"probability <b>(\d+\.\d+)</b> is (?:below|at or above) the referral threshold (\d+\.\d+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def test_referral_digits_never_contradict_the_decision():
    below = pathology_referral_html(0.2976, _card(0.2984))  # both are "0.298" at three decimals
    assert 'data-decision="below"' in below and "0.298<" not in below and "0.298 " not in below
    p, t = _shown(below)
    assert (p, t) == (0.2976, 0.2984) and p < t
    assert "missed 0 % of malignant cases" in below and "pathologist" in below
    exact = pathology_referral_html(0.298, _card(0.298))
    assert 'data-decision="refer"' in exact and "is at or above the referral threshold 0.30" in exact
    tiny = pathology_referral_html(0.29800000001, _card(0.29800000002))
    p, t = _shown(tiny)
    assert p < t and 'data-decision="below"' in tiny


def test_referral_on_a_real_prediction_at_a_threshold_equal_at_three_decimals(bundle, monkeypatch):
    result = analyze_slide(bundle, [SLIDES[0]])
    p = result.prob_malignant
    for threshold, decision in ((p + 4e-7, "below"), (p, "refer"), (p - 4e-7, "refer")):
        monkeypatch.setitem(bundle.card, "operating_threshold", threshold)
        text = pathology_referral_html(p, bundle.card)
        assert f'data-decision="{decision}"' in text
        shown_p, shown_t = _shown(text)
        assert (shown_p < shown_t) if decision == "below" else (shown_p >= shown_t)


# ------------------------------------------------------------------------------------------ H&E check


def test_dermoscopy_photo_gets_visible_warnings_and_he_images_none(bundle, tmp_path):
    small = analyze_slide(bundle, [HAM[0]])  # 128 px: a single patch
    assert small.n_patches == 1
    assert any("Only 1 tissue patch " in w for w in small.warnings)
    assert any("do not look like H&E" in w for w in small.warnings)
    # the same photograph enlarged to the size of an H&E image: plenty of patches, the colour check still fires
    large = tmp_path / "dermoscopy_large.png"
    Image.open(HAM[0]).convert("RGB").resize((896, 768), Image.BICUBIC).save(large)
    enlarged = analyze_slide(bundle, [large])
    assert enlarged.n_patches >= 8 and enlarged.blue_excess < MIN_BLUE_EXCESS
    assert [w for w in enlarged.warnings if "do not look like H&E" in w]
    for slide in SLIDES:
        result = analyze_slide(bundle, [slide])
        assert result.warnings == [] and result.blue_excess > MIN_BLUE_EXCESS + 0.04, slide.name


def test_colour_check_on_the_samples():
    settings = TilingSettings(patch_size=128, min_tissue=0.25)
    he = [blue_excess(tile_image(Image.open(p).convert("RGB"), settings).patches) for p in SLIDES]
    skin = []
    for path in HAM[:60]:
        try:
            skin.append(blue_excess(tile_image(Image.open(path).convert("RGB"), settings).patches))
        except ValueError:  # no tissue-like patch at all
            continue
    assert min(he) >= MIN_BLUE_EXCESS and np.mean(np.asarray(skin) < MIN_BLUE_EXCESS) > 0.95
    grey = np.full((4, 128, 128, 3), 128, dtype=np.uint8)
    assert blue_excess(grey) == 0.0


# ------------------------------------------------------------------------------------------ whole-slide files


def _pyramid(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A two-level tiled pyramidal TIFF (1792 x 1536 and 896 x 768 px), each level its own page, as scanners write."""
    tifffile = pytest.importorskip("tifffile")
    rgb = np.tile(np.asarray(Image.open(SLIDES[0]).convert("RGB")), (2, 2, 1))
    path = tmp_path / "case_slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path, rgb


def test_pyramidal_tiff_is_read_by_openslide_at_a_level_within_the_pixel_cap(tmp_path, bundle):
    openslide = pytest.importorskip("openslide")
    path, rgb = _pyramid(tmp_path)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 2 and slide.level_dimensions == ((1792, 1536), (896, 768))
    settings = TilingSettings(patch_size=128, min_tissue=0.25)
    full = load_bag(path, settings, limits=ImageLimits(max_pixels=5_000_000))
    assert full.level == 0 and full.extra["reader"] == "openslide"
    capped = load_bag(path, settings, limits=ImageLimits(max_pixels=1_000_000))  # level 0 is 2.75 MP
    assert capped.level == 1 and capped.extra["reader"] == "openslide" and capped.extra["level_downsample"] == 2.0
    half = rgb[::2, ::2]
    for (x, y), patch in zip(capped.coords, capped.patches):
        assert np.array_equal(patch, half[y : y + 128, x : x + 128])
    flat = tile_image(Image.fromarray(np.ascontiguousarray(half)), settings)
    assert abs(len(capped) - len(flat)) <= 2  # the mask comes from the overview: borderline patches may differ
    with pytest.raises(ValueError, match=r"no pyramid level within 0.1 MP \(its smallest, level 1, is 896 x 768 px\)"):
        load_bag(path, settings, limits=ImageLimits(max_pixels=100_000))
    # through the tab's analysis: the level change is a visible warning
    result = analyze_slide(bundle, [path], limits=ImageLimits(max_pixels=1_000_000))
    assert result.level == 1 and any("pyramid level 1" in w for w in result.warnings)


def test_tiffslide_reads_what_openslide_cannot(tmp_path, monkeypatch):
    pytest.importorskip("tiffslide")
    openslide = pytest.importorskip("openslide")
    path, rgb = _pyramid(tmp_path)

    def refuse(_path):
        raise openslide.OpenSlideUnsupportedFormatError("unsupported")

    monkeypatch.setattr(openslide, "OpenSlide", refuse)
    bag = load_bag(path, TilingSettings(patch_size=128, min_tissue=0.25), limits=ImageLimits(max_pixels=1_000_000))
    assert bag.extra["reader"] == "tiffslide" and bag.level == 1
    x, y = bag.coords[0]
    assert np.array_equal(bag.patches[0], rgb[::2, ::2][y : y + 128, x : x + 128])


# ------------------------------------------------------------------------------------------ messages


def test_messages_name_the_users_file_never_a_server_path():
    upload = "/tmp/gradio/4f1c0a9e/scan 7.jpg"
    for err in (ImageError(f"image 'scan 7.jpg' does not exist (looked for '{upload}')"),
                FileNotFoundError(f"slide '{upload}' does not exist"),
                OSError(f"[Errno 13] Permission denied: '{upload}'"),
                ValueError("could not read /var/lib/lesionlab/uploads/abc/scan 7.jpg: truncated")):
        text = public_message(err, [upload], ["scan 7.jpg"])
        assert "/tmp" not in text and "/var" not in text and "gradio" not in text, text
        assert "scan 7.jpg" in text
    assert public_message(ValueError("expected a JPEG/PNG/TIFF file"), [], []) == "expected a JPEG/PNG/TIFF file"


# ------------------------------------------------------------------------------------------ through the app


def test_app_pathology_tab_uses_the_server_limits_and_shows_no_paths(tmp_path, monkeypatch):
    from conftest_app import start_server
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    models = tmp_path / "models"
    models.mkdir()
    (models / "pathology_bundle").symlink_to(BUNDLE)
    uploads = tmp_path / "uploads"
    audit = tmp_path / "audit.jsonl"
    demo, url = start_server(models, uploads, max_megapixels=2.0, max_file_mb=3.0, upload_grace_s=0.5,
                             audit_log=str(audit))
    try:
        client = Client(url, verbose=False)
        referral, label, heatmap, gallery, note, details = client.predict(
            [handle_file(str(SLIDES[0]))], "pathology_bundle", api_name="/predict_slide")
        assert 'data-decision="' in referral and "referral threshold" in referral
        assert details["warnings"] == [] and details["n_patches"] > 8 and len(gallery) == 6
        details_first = details
        assert "tissue patches" in note and "referral threshold" in note.lower()
        shown = re.search(r"P\(malignant\) ([\d.]+), threshold ([\d.]+)", note)
        assert shown and shown.group(1) != shown.group(2)
        # over the server's --max-megapixels: refused from the header, naming the user's file and the limit
        big = _big_slide(tmp_path)
        with pytest.raises(AppError, match=r"big_case.png' has 2\.8 MP \(1792 x 1536\); at most 2 MP") as err:
            client.predict([handle_file(str(big))], "pathology_bundle", api_name="/predict_slide")
        assert str(uploads) not in str(err.value) and "/tmp" not in str(err.value)
        # over --max-file-mb
        noisy = tmp_path / "noisy_case.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1100, 3), dtype=np.uint8)).save(noisy)
        with pytest.raises(AppError, match=r"noisy_case.png' is 3\.\d MB; at most 3 MB"):
            client.predict([handle_file(str(noisy))], "pathology_bundle", api_name="/predict_slide")
        # broken files: the message names the file only
        for name, data in (("broken_slide.svs", b"not a slide at all" * 10), ("notes.jpg", b"plain text")):
            bad = tmp_path / name
            bad.write_bytes(data)
            with pytest.raises(AppError) as err:
                client.predict([handle_file(str(bad))], "pathology_bundle", api_name="/predict_slide")
            message = str(err.value)
            assert name in message and str(tmp_path) not in message and "/tmp" not in message, message
        # a dermoscopy photo: analysed, with the warning visible above the referral
        referral, *_, details = client.predict([handle_file(str(HAM[0]))], "pathology_bundle",
                                               api_name="/predict_slide")
        assert "ll-warning" in referral and "do not look like H&amp;E" in referral
        assert any("Only 1 tissue patch" in w for w in details["warnings"])
        # every case is audited and counted, without a file name
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [line["endpoint"] for line in lines] == ["predict_slide"] * 6
        assert [line["outcome"] for line in lines] == ["ok", "error", "error", "error", "error", "ok"]
        assert lines[0]["referral"] == details_first["referral"] and lines[0]["model"] == "pathology_bundle"
        assert lines[1]["error"] == "ImageError"
        text = audit.read_text()
        for name in ("big_case", "noisy_case", "broken_slide", "notes", HAM[0].stem, SLIDES[0].stem):
            assert name not in text, name
        with urllib.request.urlopen(url + "metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'lesionlab_requests_total{endpoint="predict_slide",model="pathology_bundle"} 6.0' in metrics
    finally:
        demo.close()


def test_max_case_patches_is_the_documented_cap():
    text = (ROOT / "docs" / "mil.md").read_text()
    assert f"{MAX_CASE_PATCHES} patches" in text and f"{MIN_BLUE_EXCESS:.2f}" in text
