"""The out-of-distribution score: fitting, the bundle's `ood` block and arrays, the predictor and the app's warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest_app import SAMPLE_IMAGES, make_bundle, serving
from PIL import Image

from models.bundle import OOD_FILE, load_bundle, save_bundle, write_ood
from pipelines.ood import dataset_features, fit_ood, stratified_subsample
from pipelines.prediction import Predictor

FIT_IMAGE = SAMPLE_IMAGES / "ISIC_0024307.jpg"


def gaussian_classes(rng: np.random.Generator, n: int, means: np.ndarray, scales: np.ndarray):
    """n points per class around each mean, with one shared axis-aligned covariance diag(scales ** 2)."""
    labels = np.repeat(np.arange(len(means)), n)
    return means[labels] + rng.normal(size=(len(labels), means.shape[1])) * scales, labels


def test_fit_ood_flags_about_the_percentile_and_shifted_points():
    rng = np.random.default_rng(0)
    dim = 16
    means = rng.normal(scale=4.0, size=(3, dim))
    scales = np.geomspace(5.0, 0.2, dim)  # one shared, very anisotropic covariance
    train, labels = gaussian_classes(rng, 300, means, scales)
    val, _ = gaussian_classes(rng, 700, means, scales)
    held_out, _ = gaussian_classes(rng, 3000, means, scales)
    detector = fit_ood(train, labels, val, percentile=99.0, fitted_on="synthetic", normalization="none")
    block = detector.block
    assert block["method"] == "mahalanobis" and block["feature_dim"] == dim and block["shrinkage"] < 0.1
    assert block["n_train"] == 900 and block["n_val"] == 2100 and block["percentile"] == 99.0
    assert block["threshold"] == pytest.approx(np.percentile(detector.score(val), 99.0))
    assert detector.tensors["class_means"].shape == (3, dim) and detector.tensors["precision"].shape == (dim, dim)

    held_flagged = detector.flags(detector.score(held_out)).mean()
    assert 0.003 <= held_flagged <= 0.025  # about 1 % of unseen in-distribution points

    # 2 units along the narrowest axis (10 of its standard deviations) is far; 2 units along the widest is not.
    narrow, wide = np.zeros(dim), np.zeros(dim)
    narrow[-1] = wide[0] = 2.0
    base, _ = gaussian_classes(rng, 200, means, scales)
    assert detector.flags(detector.score(base + narrow)).mean() > 0.95
    assert detector.flags(detector.score(base + wide)).mean() < 0.05
    assert detector.flags(detector.score(base + 20 * scales)).all()


def test_l2_normalized_features_score_direction_not_length():
    rng = np.random.default_rng(2)
    means = np.eye(8)[:3] * 3 + 1.0
    train, labels = gaussian_classes(rng, 200, means, np.full(8, 0.3))
    val, _ = gaussian_classes(rng, 300, means, np.full(8, 0.3))
    detector = fit_ood(train, labels, val)
    assert detector.block["feature_normalization"] == "l2"
    np.testing.assert_allclose(detector.score(5 * val[:20]), detector.score(val[:20]), rtol=1e-9)
    other_direction = np.zeros((5, 8))
    other_direction[:, -1] = 4.0
    assert detector.flags(detector.score(other_direction)).all()


def test_energy_method_and_bad_inputs():
    rng = np.random.default_rng(1)
    val_logits = rng.normal(size=(500, 4)) + np.array([6.0, 0, 0, 0])
    detector = fit_ood(np.zeros((0, 8)), [], rng.normal(size=(500, 8)), 95.0, "energy", val_logits)
    assert detector.block["method"] == "energy" and detector.tensors == {}
    assert detector.flags(detector.score(None, np.zeros((3, 4)))).all()  # flat, low logits: high energy
    assert not detector.flags(detector.score(None, np.array([[12.0, 0, 0, 0]]))).any()
    with pytest.raises(ValueError, match="percentile"):
        fit_ood(rng.normal(size=(10, 3)), np.zeros(10), rng.normal(size=(10, 3)), percentile=100.0)
    with pytest.raises(ValueError, match="one label per image"):
        fit_ood(rng.normal(size=(10, 3)), np.zeros(9), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="unknown out-of-distribution method"):
        fit_ood(rng.normal(size=(10, 3)), np.zeros(10), rng.normal(size=(10, 3)), method="knn")


def test_stratified_subsample_keeps_rare_classes():
    labels = np.array(["nv"] * 5000 + ["mel"] * 600 + ["df"] * 12)
    rows = stratified_subsample(labels, 1000, seed=0)
    counts = pd.Series(labels[rows]).value_counts()
    assert counts["df"] == 12 and counts["mel"] == pytest.approx(107, abs=2) and len(rows) == 1000
    assert np.array_equal(rows, stratified_subsample(labels, 1000, seed=0)) and len(set(rows)) == len(rows)
    assert np.array_equal(stratified_subsample(labels[:100], 1000), np.arange(100))


def sample_rows() -> pd.DataFrame:
    meta = pd.read_csv(SAMPLE_IMAGES.parent / "metadata.csv", dtype=str)
    meta["path"] = [str(SAMPLE_IMAGES / f"{i}.jpg") for i in meta.image_id]
    return meta.rename(columns={"dx": "label"}).sort_values("image_id").reset_index(drop=True)


def fit_on_sample(bundle_dir: Path) -> dict:
    """Fit the score on sample images (the first 300 by name, FIT_IMAGE among them; the next 150 for the threshold)
    and write it into the bundle."""
    from pipelines.data import ImageDataset
    from pipelines.transforms import card_transform

    bundle = load_bundle(bundle_dir)
    rows = sample_rows()
    transform = card_transform(bundle.card)
    train = ImageDataset(rows.iloc[:300], bundle.class_names, transform)
    val = ImageDataset(rows.iloc[300:450], bundle.class_names, transform)
    assert FIT_IMAGE.stem in set(rows.image_id.iloc[:300])
    train_features, _, train_labels = dataset_features(bundle.model, train)
    val_features, _, _ = dataset_features(bundle.model, val)
    detector = fit_ood(train_features, train_labels, val_features, fitted_on="300 + 150 sample images")
    write_ood(bundle_dir, detector.block, detector.torch_tensors())
    return detector.block


@pytest.fixture(scope="module")
def ood_models(tmp_path_factory) -> Path:
    """A models folder: `cnn` with an out-of-distribution score fitted on sample images, `plain` without one."""
    root = tmp_path_factory.mktemp("ood_models")
    make_bundle(root / "cnn", "small-cnn", 64, widths=[8, 16, 32])
    fit_on_sample(root / "cnn")
    make_bundle(root / "plain", "small-cnn", 64, seed=1, widths=[8, 16, 32])
    return root


def test_bundle_round_trip_without_pickles_and_same_score_as_the_fit(ood_models, tmp_path):
    folder = ood_models / "cnn"
    card = json.loads((folder / "card.json").read_text())
    assert card["ood"]["tensors"] == OOD_FILE and card["ood"]["feature_dim"] == 32
    raw = (folder / OOD_FILE).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    names = set(json.loads(raw[8 : 8 + header])) - {"__metadata__"}
    assert names == {"class_means", "precision"}  # a safetensors file, not a pickle
    bundle = load_bundle(folder)
    assert bundle.extras["ood"]["precision"].shape == (32, 32)

    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))[500:504]]
    one, eight = Predictor(bundle, tta=1), Predictor(bundle, tta=8)
    probs, scores = eight.predict_with_ood(images)
    np.testing.assert_allclose(probs, eight.predict(images), atol=1e-6)
    np.testing.assert_allclose(scores, one.predict_with_ood(images)[1], rtol=1e-5)  # the un-augmented view only
    with torch.no_grad():
        features = bundle.model.forward_features(torch.stack([one.transform(im) for im in images])).numpy()
    np.testing.assert_allclose(scores, one.ood.score(features), rtol=1e-4)

    # A stage that copies the card onto a changed network (pruning, re-trained heads) does not carry the block over.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    save_bundle(copy, bundle.model, {k: v for k, v in bundle.card.items() if k != "format_version"})
    assert "ood" not in json.loads((copy / "card.json").read_text()) and not (copy / OOD_FILE).exists()
    assert Predictor(load_bundle(copy)).ood is None
    # A card that promises arrays the folder lacks is an error, not a silent "in distribution".
    shutil.copy(folder / "card.json", copy / "card.json")
    with pytest.raises(FileNotFoundError, match="no ood.safetensors"):
        load_bundle(copy)


def test_an_old_bundle_loads_with_no_ood_check(ood_models):
    predictor = Predictor(load_bundle(ood_models / "plain"))
    images = [Image.open(FIT_IMAGE).convert("RGB")]
    probs, scores = predictor.predict_with_ood(images)
    assert predictor.ood is None and scores is None and predictor.ood_flags(scores) is None
    np.testing.assert_allclose(probs, predictor.predict(images))


def test_an_ensemble_scores_with_its_first_members_features(ood_models, tmp_path):
    from models.bundle import save_ensemble

    members = [load_bundle(ood_models / name) for name in ("cnn", "plain")]
    folder = save_ensemble(tmp_path / "ensemble", [(b.model, b.card) for b in members], {})
    assert Predictor(load_bundle(folder)).ood is None  # the copied block is not carried over
    block = json.loads((ood_models / "cnn" / "card.json").read_text())["ood"]
    write_ood(folder / "member_0", block, load_bundle(ood_models / "cnn").extras["ood"])
    images = [Image.open(FIT_IMAGE).convert("RGB"), Image.new("RGB", (200, 200), (40, 40, 40))]
    _, scores = Predictor(load_bundle(folder)).predict_with_ood(images)
    np.testing.assert_allclose(scores, Predictor(members[0]).predict_with_ood(images)[1], rtol=1e-6)


def test_training_fits_the_score_for_new_bundles(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    block = card["ood"]
    assert block["method"] == "mahalanobis" and block["n_train"] == 84 and block["n_val"] == 28
    assert block["validation_flagged"] <= 0.05 and (tiny_bundle / OOD_FILE).is_file()
    assert "validation split (28 images)" in block["fitted_on"]
    assert Predictor.from_path(tiny_bundle).ood.threshold == block["threshold"]


def test_warning_wording():
    from app.wording import ood_warnings

    block = {"threshold": 80.0, "percentile": 99.0}
    assert ood_warnings(79.9, block) == [] and ood_warnings(80.0, block) == [] and ood_warnings(95.0, None) == []
    (text,) = ood_warnings(95.04, block)
    assert text.startswith("This image looks unlike the dermoscopy images the model was trained on (")
    assert "95.0 is above 80.0" in text and "about 1 % of the validation images" in text
    assert text.endswith("); the result may be unreliable.")


@pytest.fixture(scope="module")
def app_client(ood_models, tmp_path_factory):
    from gradio_client import Client

    with serving(ood_models, tmp_path_factory.mktemp("gradio_ood")) as (demo, url):
        yield Client(url, verbose=False)


def classify(client, path: Path, model: str = "cnn"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), model, api_name="/classify")


def test_the_app_warns_on_images_unlike_dermoscopy(app_client, tmp_path):
    """Uniform grey images are flagged, a dermoscopy image of the fit set is not (the test network has random
    weights; benchmarks/fit_ood.py measures the shipped model on microscopy, photographs and screenshots)."""
    greys = [tmp_path / "dark.png", tmp_path / "light.png"]
    Image.new("RGB", (300, 240), (40, 40, 40)).save(greys[0])
    Image.new("RGB", (240, 300), (200, 200, 200)).save(greys[1])
    for path in greys:
        referral, *_, details = classify(app_client, path)
        assert details["ood"]["flagged"] is True and details["ood"]["score"] > details["ood"]["threshold"]
        assert any("looks unlike the dermoscopy images" in w for w in details["warnings"])
        assert "looks unlike the dermoscopy images" in referral and "ll-warning" in referral
        assert details["probabilities"]  # a warning, not a refusal

    referral, *_, details = classify(app_client, FIT_IMAGE)
    assert details["ood"]["flagged"] is False and details["ood"]["score"] <= details["ood"]["threshold"]
    assert details["warnings"] == [] and "ll-warning" not in referral

    _, *_, plain = classify(app_client, greys[0], model="plain")
    assert plain["ood"] is None and plain["warnings"] == []


def test_the_batch_screen_flags_but_the_csv_keeps_its_columns(app_client, tmp_path):
    from gradio_client import handle_file

    grey = tmp_path / "grey.png"
    Image.new("RGB", (300, 240), (90, 90, 90)).save(grey)
    table, csv, _ = app_client.predict([handle_file(str(FIT_IMAGE)), handle_file(str(grey))], "cnn",
                                       api_name="/classify_batch")
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    assert [row["ood_flag"] for row in rows] == [False, True]
    assert "ood_flag" not in pd.read_csv(csv).columns
    plain, _, _ = app_client.predict([handle_file(str(FIT_IMAGE))], "plain", api_name="/classify_batch")
    assert "ood_flag" not in plain["headers"]
