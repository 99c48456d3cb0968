"""SC-MIL: tiling on real H&E images, attention pooling, SupCon loss, beta schedule, MIL bundle, pathology tab."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.scmil import SCMIL, SCMILLoss, beta_schedule, build_scmil, supcon_loss
from pipelines.bags import bag_from_patch_folder, load_bag, tile_image, tissue_mask
from pipelines.config import TilingSettings

UCSB_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ucsb_breast_sample"
SLIDES = sorted((UCSB_SAMPLE / "images").glob("*.jpg"))


# ------------------------------------------------------------------------------------------------------ tiling


def test_tiling_covers_the_tissue_and_drops_blank_patches():
    image = Image.open(SLIDES[0]).convert("RGB")
    rgb = np.asarray(image).copy()
    rgb[:, 512:] = 245  # the right part becomes bare glass
    settings = TilingSettings(patch_size=128, min_tissue=0.25)
    bag = tile_image(Image.fromarray(rgb), settings, "half-blank")

    mask = tissue_mask(rgb)
    covered = np.zeros_like(mask)
    for x, y in bag.coords:
        covered[y : y + 128, x : x + 128] = True
    assert mask[:, 512:].sum() == 0
    assert covered[:, 512:].sum() == 0, "a patch on bare glass was kept"
    assert (covered & mask).sum() / mask.sum() > 0.9, "kept patches miss tissue"
    assert len(bag) == len(bag.patches) == len(bag.coords) and bag.patches.shape[1:] == (128, 128, 3)
    assert (bag.tissue_fraction >= 0.25).all()
    # the patch pixels are the image's pixels at the recorded coordinates
    x, y = bag.coords[0]
    assert np.array_equal(bag.patches[0], rgb[y : y + 128, x : x + 128])


def test_blank_image_raises_and_max_patches_keeps_the_most_tissue():
    with pytest.raises(ValueError, match="blank.*no patch with at least"):
        tile_image(Image.new("RGB", (512, 512), (250, 250, 250)), TilingSettings(), "blank")
    with pytest.raises(ValueError, match="at least 128 x 128"):
        tile_image(Image.new("RGB", (100, 300), (200, 50, 150)), TilingSettings(), "tiny")
    full = load_bag(SLIDES[1], TilingSettings(min_tissue=0.0))
    top = load_bag(SLIDES[1], TilingSettings(min_tissue=0.0, max_patches=5))
    assert len(full) == 42 and len(top) == 5
    assert np.allclose(np.sort(top.tissue_fraction), np.sort(full.tissue_fraction)[-5:])


def test_patch_folder_is_one_bag_with_coordinates_from_names(tmp_path):
    image = Image.open(SLIDES[0]).convert("RGB")
    for x, y in [(0, 0), (128, 0)]:
        image.crop((x, y, x + 128, y + 128)).save(tmp_path / f"case7_{x}_{y}.png")
    image.crop((256, 128, 384, 256)).save(tmp_path / "case7_x256_y128.png")
    bag = bag_from_patch_folder(tmp_path, TilingSettings(patch_size=64))
    assert bag.slide_id == tmp_path.name and len(bag) == 3 and bag.patches.shape[1:] == (64, 64, 3)
    assert sorted(map(tuple, bag.coords.tolist())) == [(0, 0), (128, 0), (256, 128)]


# ------------------------------------------------------------------------------------------------------- model


def test_attention_weights_are_a_distribution_over_the_bag():
    torch.manual_seed(0)
    model = SCMIL(2, torch.nn.Identity(), 16, embed_dim=8, attention_dim=4).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = model(x, mask, return_all=True)
    assert out.logits.shape == (3, 2) and out.projection.shape == (3, 128)
    assert torch.allclose(out.attention.sum(1), torch.ones(3))
    assert (out.attention >= 0).all() and (out.attention[~mask] == 0).all()
    assert out.attention[2, 0] == 1.0
    # padding never changes a bag's output
    alone = model(x[1:2, :2], return_all=True)
    assert torch.allclose(alone.logits, out.logits[1:2], atol=1e-6)
    assert torch.allclose(out.projection.norm(dim=1), torch.ones(3))


def test_patch_bags_run_through_a_registry_encoder():
    model = build_scmil(2, 32, encoder="small-cnn", encoder_kwargs={"widths": [8, 16]}).eval()
    out = model(torch.randn(2, 4, 3, 32, 32), return_all=True)
    assert out.logits.shape == (2, 2) and out.attention.shape == (2, 4)
    with pytest.raises(ValueError, match="expects 16"):
        model(torch.randn(1, 4, 7))


def _hand_supcon(z: list[list[float]], labels: list[int], tau: float) -> float:
    norm = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in z]
    dot = [[sum(a * b for a, b in zip(norm[i], norm[j])) / tau for j in range(len(z))] for i in range(len(z))]
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot[i][a]) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(dot[i][p]) / denominator) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def test_supcon_equals_a_hand_computation():
    z = [[1.0, 0.2], [0.8, 0.5], [-0.3, 1.0], [0.1, -1.0], [0.5, 0.5]]
    labels = [0, 0, 1, 1, 2]  # the last sample has no positive: it is no anchor but is in every denominator
    projection = torch.nn.functional.normalize(torch.tensor(z), dim=1)
    got = supcon_loss(projection, torch.tensor(labels), temperature=0.5)
    assert got.item() == pytest.approx(_hand_supcon(z, labels, 0.5), rel=1e-5)


def test_supcon_is_lower_for_well_separated_embeddings():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    separated = torch.tensor([[1.0, 0.05], [1.0, 0.0], [1.0, -0.05], [-1.0, 0.05], [-1.0, 0.0], [-1.0, -0.05]])
    mixed = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.1], [0.0, -1.0]])
    f = torch.nn.functional.normalize
    assert supcon_loss(f(separated, dim=1), labels) < supcon_loss(f(mixed, dim=1), labels) - 1.0


def test_beta_schedule_start_middle_end():
    assert [beta_schedule(e, 11, "parabolic") for e in (0, 5, 10)] == pytest.approx([1.0, 0.75, 0.0])
    assert [beta_schedule(e, 11, "linear") for e in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert [beta_schedule(e, 11, "step") for e in (0, 4, 5, 10)] == [1.0, 1.0, 0.0, 0.0]
    assert SCMILLoss(11, method="abmil").beta(0) == 0.0 and SCMILLoss(11).beta(0) == 1.0
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule(0, 3, "cosine")
    with pytest.raises(ValueError, match="outside a run of 3 epochs"):
        beta_schedule(3, 3)


def test_loss_mixes_supcon_and_ce_by_beta():
    torch.manual_seed(0)
    model = SCMIL(2, torch.nn.Identity(), 8, embed_dim=8)
    out = model(torch.randn(4, 3, 8), return_all=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = SCMILLoss(5, temperature=0.1)
    mid, parts = loss(out, labels, 2)
    assert parts["beta"] == pytest.approx(0.75)
    assert mid.item() == pytest.approx(0.75 * parts["supcon"] + 0.25 * parts["ce"], rel=1e-5)
    end, parts_end = loss(out, labels, 4)
    assert end.item() == pytest.approx(parts_end["ce"])


# ---------------------------------------------------------------------------------------- training, bundle, CLI


def _mil_config(run_dir: Path, **mil):
    from pipelines.config import RunConfig

    return RunConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "split": {"val_fraction": 0.34, "test_fraction": 0.0, "seed": 0},
            "training": {"epochs": 3, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0, "patience": 5,
                         "device": "cpu", "seed": 0},
            "mil": {
                "data": {"root": str(UCSB_SAMPLE), "group_column": "tma_batch"},
                "encoder": "small-cnn",
                "pretrained": False,
                "input_size": 32,
                "embed_dim": 16,
                "attention_dim": 8,
                "projection_dim": 8,
                "tiling": {"patch_size": 128, "min_tissue": 0.25},
                **mil,
            },
        }
    )


@pytest.fixture(scope="module")
def mil_bundle(tmp_path_factory) -> Path:
    from pipelines.mil import run_mil_stage

    run_dir = tmp_path_factory.mktemp("mil_run")
    outputs = run_mil_stage(_mil_config(run_dir), run_dir)
    assert outputs.report.is_file()
    return outputs.bundle


def test_mil_run_writes_bag_manifest_and_card(mil_bundle):
    from models.bundle import read_card
    from pipelines.bags import read_bag_manifest

    run_dir = mil_bundle.parent
    bags = read_bag_manifest(run_dir / "mil" / "bags.csv")
    assert sorted(bags.slide_id.unique()) == sorted(p.stem for p in SLIDES)
    assert set(bags.label) == {"benign", "malignant"} and (bags["size"] == 128).all()
    slides = pd.read_csv(run_dir / "mil" / "slides.csv")
    assert slides.groupby("group").split.nunique().max() == 1  # no TMA batch in two splits
    card = read_card(mil_bundle)
    assert card["task"] == "mil" and card["tiling"]["patch_size"] == 128 and card["mil"]["method"] == "scmil"
    assert card["class_names"] == ["benign", "malignant"] and card["malignant_classes"] == ["malignant"]
    # 3 epochs, parabolic beta 1.0 / 0.75 / 0.0: only the last epoch has a trained classifier, so it is the one kept
    assert card["training"]["selected_epoch"] == 3 and card["training"]["epochs_run"] == 3
    # A handful of validation slides cannot fit a temperature: the card says so instead of over-fitting one.
    assert card["calibration"]["method"] == "none" and "validation slides" in card["calibration"]["reason"]
    # Metrics per split (no test slides here), as on an image card, with their 95 % bootstrap intervals.
    assert set(card["metrics"]) == {"validation"} and "intervals" in card["metrics"]["validation"]
    assert "recall 95 % interval" in (run_dir / "report" / "report.md").read_text()
    assert len(list((run_dir / "mil" / "cache").glob("*.safetensors"))) == len(SLIDES)


def test_mil_bundle_round_trips_and_predicts_one_row_per_slide(mil_bundle, tmp_path):
    from models.bundle import load_bundle
    from pipelines.bags import tile_image
    from pipelines.mil import predict_bag, predict_slides, tiling_of

    bundle = load_bundle(mil_bundle)
    table = predict_slides(bundle, UCSB_SAMPLE / "images")
    assert list(table.image_id) == [p.stem for p in SLIDES]
    assert list(table.columns[:4]) == ["image_id", "pred_label", "prob_benign", "prob_malignant"]
    assert np.allclose(table.prob_benign + table.prob_malignant, 1.0, atol=1e-5)
    assert (table.n_patches > 10).all()
    # the reloaded bundle answers exactly as the trained net over the same bag
    again = predict_slides(str(mil_bundle), [SLIDES[2]])
    assert again.prob_malignant.iloc[0] == pytest.approx(table.prob_malignant.iloc[2], abs=1e-6)
    bag = tile_image(Image.open(SLIDES[2]).convert("RGB"), tiling_of(bundle))
    assert predict_bag(bundle, bag).probs[1] == pytest.approx(table.prob_malignant.iloc[2], abs=1e-6)
    # a folder of pre-extracted patches is one more slide
    folder = tmp_path / "slides"
    (folder / "case_a").mkdir(parents=True)
    for i in range(3):
        Image.open(SLIDES[0]).convert("RGB").crop((128 * i, 0, 128 * i + 128, 128)).save(folder / "case_a" / f"{i}.png")
    Image.open(SLIDES[1]).save(folder / "slide_b.jpg")
    rows = predict_slides(bundle, folder)
    assert list(rows.image_id) == ["case_a", "slide_b"] and list(rows.n_patches)[0] == 3
    # a blank or unreadable slide is skipped with its reason when errors are collected, raised otherwise
    Image.new("RGB", (512, 512), "white").save(folder / "slide_c_blank.png")
    (folder / "slide_d_broken.jpg").write_bytes(b"not a jpeg")
    errors: list[str] = []
    rows = predict_slides(bundle, folder, errors)
    assert list(rows.image_id) == ["case_a", "slide_b"] and len(errors) == 2
    assert "slide_c_blank" in errors[0] and "not a readable image" in errors[1]
    with pytest.raises(ValueError, match="slide_c_blank"):
        predict_slides(bundle, [folder / "slide_c_blank.png"])


def test_lesionlab_predict_and_tile_commands(mil_bundle, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "slides.csv"
    assert main(["predict", "--bundle", str(mil_bundle), "--images", str(UCSB_SAMPLE / "images"),
                 "--out", str(out)]) in (0, None)
    table = pd.read_csv(out)
    assert len(table) == len(SLIDES) and table.columns.tolist().count("prob_malignant") == 1
    bags = tmp_path / "bags.csv"
    assert main(["tile", "--root", str(UCSB_SAMPLE), "--labels", "labels.csv", "--group-column", "tma_batch",
                 "--patch-size", "256", "--out", str(bags)]) in (0, None)
    manifest = pd.read_csv(bags)
    assert set(manifest.group) == set(pd.read_csv(UCSB_SAMPLE / "labels.csv").tma_batch)
    assert manifest.groupby("slide_id").size().max() <= 3 * 3 and (manifest["size"] == 256).all()


def test_abmil_with_a_trainable_encoder_on_patch_bags(tmp_path):
    from models.bundle import load_bundle
    from pipelines.mil import predict_slides, run_mil_stage

    config = _mil_config(tmp_path, method="abmil", freeze_encoder=False, cache_embeddings=False,
                         max_train_instances=8)
    config.training.epochs = 1
    outputs = run_mil_stage(config, tmp_path)
    bundle = load_bundle(outputs.bundle)
    assert bundle.card["mil"]["method"] == "abmil" and not bundle.card["architecture"]["kwargs"]["freeze_encoder"]
    assert len(predict_slides(bundle, SLIDES[:2])) == 2


def test_mil_stage_reads_a_split_manifest_and_scores_the_test_slides(tmp_path):
    """With test slides, the threshold chosen on validation is applied to them and the report describes them."""
    from models.bundle import read_card
    from pipelines.bags import ingest_slide_table
    from pipelines.mil import run_mil_stage

    slides = ingest_slide_table(UCSB_SAMPLE, group_column="tma_batch")
    split = {"ytma10_010704_malignant3_ccd": "train", "ytma49_042003_benign2_ccd": "train",
             "ytma49_042003_benign3_ccd": "val", "ytma49_042203_malignant3_ccd": "val",
             "ytma49_111003_benign3_ccd": "test", "ytma49_111003_malignant1_ccd": "test"}
    slides["split"] = slides.image_id.map(split)
    slides.to_csv(tmp_path / "manifest.csv", index=False)
    config = _mil_config(tmp_path / "run", method="abmil")
    config.mil.data = None  # the slides come from the run's manifest
    config.training.epochs = 1
    outputs = run_mil_stage(config, tmp_path / "run", tmp_path / "manifest.csv")

    card = read_card(outputs.bundle)
    assert set(card["metrics"]) == {"validation", "test"}
    assert card["metrics"]["test"]["n"] == 2 and card["metrics"]["validation"]["n"] == 2
    assert card["operating_threshold"] is not None
    assert card["metrics"]["test"]["at_operating_threshold"]["threshold"] == card["operating_threshold"]
    assert outputs.report.read_text().startswith("# ABMIL on test slides")
    assert dict(pd.read_csv(outputs.files["slides"])[["image_id", "split"]].values) == split


# ------------------------------------------------------------------------------------------------- pathology tab


def test_analyze_slide_gives_probabilities_heatmap_and_top_patches(mil_bundle):
    from app.pathology import analyze_slide
    from models.bundle import load_bundle

    bundle = load_bundle(mil_bundle)
    result = analyze_slide(bundle, [SLIDES[0]])
    assert set(result.probabilities) == {"benign", "malignant"}
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.heatmap.size == Image.open(SLIDES[0]).size
    assert len(result.top_patches) == 6 and result.attention.sum() == pytest.approx(1.0, abs=1e-5)
    captions = [float(c.split()[1]) for _, c in result.top_patches]
    assert captions == sorted(captions, reverse=True) and captions[0] == pytest.approx(result.attention.max(), abs=1e-3)
    patches = analyze_slide(bundle, [Image.open(SLIDES[0]).crop((0, 0, 128, 128)), Image.open(SLIDES[1])])
    assert patches.n_patches == 2


def test_pathology_tab_answers_through_gradio_client(mil_bundle, tmp_path, monkeypatch):
    import gradio as gr
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from app.pathology import build_pathology_tab
    from models.bundle import load_bundle

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_pathology_tab({"scmil": load_bundle(mil_bundle)})
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        referral, label, heatmap, gallery, note, details = client.predict(
            [handle_file(str(SLIDES[0]))], "scmil", api_name="/predict_slide"
        )
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        direct = predict_direct(mil_bundle, SLIDES[0])
        assert confidences["malignant"] == pytest.approx(direct, abs=1e-4)
        assert details["p_malignant"] == pytest.approx(direct, abs=1e-6)
        assert Image.open(heatmap).size == Image.open(SLIDES[0]).size
        assert len(gallery) == 6 and "tissue patches" in note and 'class="ll-badge"' in referral
        uploads = [p for p in Path(tmp_path).rglob(SLIDES[0].name)]
        deadline = time.monotonic() + 10
        while uploads and any(p.exists() for p in uploads) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(p.exists() for p in uploads), "the upload was not deleted after the analysis"
        with pytest.raises(AppError, match="no patch with at least"):
            blank = tmp_path / "blank_case.png"
            Image.new("RGB", (512, 512), "white").save(blank)
            client.predict([handle_file(str(blank))], "scmil", api_name="/predict_slide")
    finally:
        demo.close()


def predict_direct(bundle_dir: Path, slide: Path) -> float:
    from models.bundle import load_bundle
    from pipelines.mil import predict_slides

    return float(predict_slides(load_bundle(bundle_dir), [slide]).prob_malignant.iloc[0])


def test_pyramidal_tiff_is_tiled_at_the_requested_level(tmp_path):
    """A SubIFD pyramid (as OME-TIFF writes it): OpenSlide sees one level, so tiffslide reads it."""
    pytest.importorskip("tiffslide")
    tifffile = pytest.importorskip("tifffile")
    from pipelines.bags import is_whole_slide

    rgb = np.tile(np.asarray(Image.open(SLIDES[0]).convert("RGB")), (2, 2, 1))  # 1536 x 1792, two levels
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), subifds=1, photometric="rgb")
        tif.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    assert is_whole_slide(path) and not is_whole_slide(SLIDES[0])
    bag = load_bag(path, TilingSettings(patch_size=128, level=1, min_tissue=0.25))
    assert bag.extra["reader"] == "tiffslide"
    flat = tile_image(Image.fromarray(np.ascontiguousarray(rgb[::2, ::2])), TilingSettings(min_tissue=0.25))
    assert bag.level == 1 and bag.thumbnail_scale <= 1.0
    assert abs(len(bag) - len(flat)) <= 2  # the mask comes from a thumbnail: borderline patches may differ
    x, y = bag.coords[0]
    assert np.array_equal(bag.patches[0], rgb[::2, ::2][y : y + 128, x : x + 128])
    with pytest.raises(ValueError, match="2 levels; tiling.level 3"):
        load_bag(path, TilingSettings(level=3))
