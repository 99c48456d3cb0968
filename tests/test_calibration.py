"""Calibration, test-time augmentation, colour constancy, the image cache and ensemble bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.bundle import load_bundle, save_bundle, save_ensemble
from pipelines.calibration import calibrated_probs, fit_calibration, negative_log_likelihood
from pipelines.prediction import Predictor
from pipelines.transforms import (
    card_transform,
    dihedral_views,
    eval_transform,
    shades_of_gray,
    train_transform,
    view_logits,
)
from tests.conftest import HAM_SAMPLE


def _sample_labels(logits: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): the model is calibrated exactly at that temperature."""
    probs = calibrated_probs(logits / temperature, None)
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_held_out_nll():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=(6000, 5))
    labels = _sample_labels(logits, temperature=2.5, seed=1)
    fit, held_out = slice(0, 4000), slice(4000, None)
    block = fit_calibration(logits[fit], labels[fit], "temperature")
    assert block["temperature"] == pytest.approx(2.5, rel=0.08)
    assert block["nll_after"] < block["nll_before"] and block["ece_after"] < block["ece_before"]
    before = negative_log_likelihood(calibrated_probs(logits[held_out], None), labels[held_out])
    after = negative_log_likelihood(calibrated_probs(logits[held_out], block), labels[held_out])
    assert after < before - 0.05
    assert set(block) >= {"method", "temperature", "fitted_on", "ece_before", "ece_after", "nll_before", "nll_after"}


def test_vector_scaling_fits_per_class_offsets_and_lowers_nll():
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 3.0, size=(3000, 4))
    labels = _sample_labels(logits + np.array([2.0, 0.0, -1.0, 0.5]), temperature=1.0, seed=3)
    temperature = fit_calibration(logits, labels, "temperature")
    vector = fit_calibration(logits, labels, "vector")
    assert len(vector["weight"]) == len(vector["bias"]) == 4
    assert vector["nll_after"] < temperature["nll_after"]  # a class offset is beyond one temperature
    np.testing.assert_allclose(np.asarray(vector["bias"]) - np.mean(vector["bias"]),
                               np.array([2.0, 0.0, -1.0, 0.5]) - 0.375, atol=0.25)


def test_calibration_on_views_fits_the_average_of_calibrated_views():
    rng = np.random.default_rng(4)
    views = rng.normal(0.0, 3.0, size=(800, 8, 3))
    labels = _sample_labels(views.mean(axis=1), 1.5, seed=5)
    block = fit_calibration(views, labels)
    by_hand = np.mean([calibrated_probs(views[:, v], block) for v in range(8)], axis=0)
    np.testing.assert_allclose(calibrated_probs(views, block), by_hand, atol=1e-12)
    with pytest.raises(ValueError, match="labels for"):
        fit_calibration(views, labels[:-1])
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(views, labels, "isotonic")


def _strip_new_blocks(bundle_dir: Path, out: Path) -> Path:
    """A copy of a bundle whose card predates calibration, test-time augmentation and colour constancy."""
    shutil.copytree(bundle_dir, out)
    card = json.loads((out / "card.json").read_text())
    for key in ("calibration", "inference", "preprocessing"):
        card.pop(key, None)
    (out / "card.json").write_text(json.dumps(card))
    return out


def _sample_images(n: int = 6) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:n]]


def test_trained_bundle_carries_calibration_and_inference_blocks(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    assert card["calibration"]["method"] == "temperature" and card["calibration"]["temperature"] > 0
    assert card["calibration"]["fitted_on"].startswith("validation")
    assert card["inference"] == {"tta": 8}
    report = tiny_bundle.parent / "report"
    assert (report / "reliability_calibration.png").is_file()
    assert "## Calibration" in (report / "report.md").read_text()


def test_old_bundle_and_temperature_one_predict_the_plain_softmax(tiny_bundle, tmp_path):
    old = _strip_new_blocks(tiny_bundle, tmp_path / "old")
    images = _sample_images()
    bundle = load_bundle(old)
    predictor = Predictor(bundle)
    assert predictor.tta == 1
    batch = torch.stack([predictor.transform(im) for im in images])
    with torch.inference_mode():
        plain = torch.softmax(bundle.model(batch), dim=-1).numpy()
    np.testing.assert_allclose(predictor.predict(images), plain, atol=1e-6)

    card = json.loads((old / "card.json").read_text())
    card["calibration"] = {"method": "temperature", "temperature": 1.0}
    (old / "card.json").write_text(json.dumps(card))
    np.testing.assert_allclose(Predictor.from_path(old).predict(images), plain, atol=1e-6)


def test_predictor_applies_the_card_temperature(tiny_bundle):
    images = _sample_images()
    bundle = load_bundle(tiny_bundle)
    predictor = Predictor(bundle, tta=1)
    batch = torch.stack([predictor.transform(im) for im in images])
    with torch.inference_mode():
        logits = bundle.model(batch).numpy()
    temperature = bundle.card["calibration"]["temperature"]
    expected = torch.softmax(torch.from_numpy(logits) / temperature, dim=-1).numpy()
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)


def test_dihedral_views_are_the_group_and_tta_is_rotation_invariant(tiny_bundle):
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len({v.numpy().tobytes() for v in views}) == 8  # 8 distinct views of an asymmetric image
    rotated = {v.numpy().tobytes() for v in dihedral_views(torch.rot90(x, 1, dims=(2, 3)))}
    flipped = {v.numpy().tobytes() for v in dihedral_views(torch.flip(x, dims=(2,)))}
    assert rotated == flipped == {v.numpy().tobytes() for v in views}  # closed under the group's generators

    bundle = load_bundle(tiny_bundle)
    with torch.no_grad():  # sharpen the barely trained head so that orientation visibly matters without TTA
        bundle.model.head.weight.mul_(200.0)
    size = bundle.input_size
    image = _sample_images(1)[0].resize((size, size))
    predictor = Predictor(bundle, tta=8)
    straight, turned = predictor.predict([image, image.transpose(Image.Transpose.ROTATE_90)])
    np.testing.assert_allclose(straight, turned, atol=1e-5)
    batch = torch.stack([predictor.transform(image)])
    with torch.inference_mode():  # without TTA the network itself is not rotation invariant
        one = bundle.model(batch)
        other = bundle.model(torch.rot90(batch, 1, dims=(2, 3)))
    assert (one - other).abs().max() > 0.05


def test_tta_one_equals_the_plain_forward(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    batch = torch.randn(3, 3, bundle.input_size, bundle.input_size)
    with torch.inference_mode():
        np.testing.assert_array_equal(view_logits(bundle.model, batch, 1)[:, 0].numpy(), bundle.model(batch).numpy())
        eight = view_logits(bundle.model, batch, 8)
        np.testing.assert_allclose(eight[:, 0].numpy(), bundle.model(batch).numpy(), atol=1e-5)
        np.testing.assert_allclose(eight[:, 1].numpy(), bundle.model(torch.rot90(batch, 1, dims=(2, 3))).numpy(),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="1 or 8 views"):
        Predictor(bundle, tta=4)


def test_shades_of_gray_keeps_a_grey_balanced_image_and_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(20, 230, size=(32, 32, 1)), 3, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(shades_of_gray(grey), grey)

    image = np.asarray(_sample_images(1)[0], dtype=np.float64)
    cast = np.clip(image * np.array([1.15, 0.95, 0.75]), 0, 255).astype(np.uint8)
    corrected, reference = shades_of_gray(cast).astype(float), shades_of_gray(image.astype(np.uint8)).astype(float)
    # After correction the cast image matches the corrected original up to overall brightness.
    ratio = corrected.reshape(-1, 3).mean(0) / reference.reshape(-1, 3).mean(0)
    assert ratio.max() / ratio.min() < 1.03
    before = cast.reshape(-1, 3).mean(0) / image.reshape(-1, 3).mean(0)
    assert before.max() / before.min() > 1.4
    with pytest.raises(ValueError, match="H x W x 3"):
        shades_of_gray(grey[..., 0])


def test_colour_constancy_is_one_code_path_in_training_evaluation_and_serving(tiny_bundle, tmp_path):
    card = json.loads((tiny_bundle / "card.json").read_text())
    card["preprocessing"] = {"color_constancy": "shades_of_gray"}
    norm = card["normalization"]
    size = card["input_size"]
    image = _sample_images(1)[0]
    served = card_transform(card)
    evaluated = eval_transform(size, norm["mean"], norm["std"], "shades_of_gray")
    trained = train_transform(size, norm["mean"], norm["std"], "shades_of_gray")
    crop = evaluated.crop_array(image)
    np.testing.assert_array_equal(served(image).numpy(), evaluated(image).numpy())
    # Training corrects the same crop with the same function before its random augmentation.
    assert trained.base.correct_colour is not None
    np.testing.assert_array_equal(trained.base.correct_colour(crop), evaluated.correct_colour(crop))
    np.testing.assert_array_equal(evaluated.correct_colour(crop), shades_of_gray(crop))
    plain = eval_transform(size, norm["mean"], norm["std"])
    assert not np.allclose(plain(image).numpy(), evaluated(image).numpy())

    out = tmp_path / "sog"
    shutil.copytree(tiny_bundle, out)
    (out / "card.json").write_text(json.dumps(card))
    predictor = Predictor.from_path(out)
    np.testing.assert_array_equal(predictor.transform(image).numpy(), evaluated(image).numpy())
    from app.explain import Explainer

    np.testing.assert_array_equal(Explainer(load_bundle(out)).transform(image).numpy(), evaluated(image).numpy())
    with pytest.raises(ValueError, match="unknown colour constancy"):
        eval_transform(size, norm["mean"], norm["std"], "grey-world")


def test_image_cache_is_byte_identical_to_decoding_and_rebuilt_when_the_manifest_changes(ham_manifest, tmp_path):
    from pipelines.data import ImageDataset

    rows = ham_manifest.head(12).copy()
    names = sorted(ham_manifest.label.unique())
    transform = eval_transform(48, [0.5] * 3, [0.5] * 3, "shades_of_gray")
    cached = ImageDataset(rows, names, transform, cache_dir=tmp_path / "cache")
    decoded = ImageDataset(rows, names, transform)
    for i in range(len(rows)):
        a, b = cached[i][0], decoded[i][0]
        assert a.numpy().tobytes() == b.numpy().tobytes()
    first = set((tmp_path / "cache").glob("*.u8"))
    assert len(first) == 1
    ImageDataset(rows, names, transform, cache_dir=tmp_path / "cache")  # same rows: reused
    assert set((tmp_path / "cache").glob("*.u8")) == first
    changed = pd.concat([rows.head(11), ham_manifest.iloc[[20]]])
    ImageDataset(changed, names, transform, cache_dir=tmp_path / "cache")
    assert len(set((tmp_path / "cache").glob("*.u8"))) == 2  # another manifest, another cache

    trained = ImageDataset(rows, names, train_transform(48, [0.5] * 3, [0.5] * 3), seed=3,
                           cache_dir=tmp_path / "cache")
    reference = ImageDataset(rows, names, train_transform(48, [0.5] * 3, [0.5] * 3), seed=3)
    assert trained[5][0].numpy().tobytes() == reference[5][0].numpy().tobytes()  # same augmentation draw


def test_ensemble_bundle_saves_loads_and_averages_calibrated_member_probabilities(tiny_bundle, tmp_path):
    first = load_bundle(tiny_bundle)
    second_card = json.loads(json.dumps(first.card))
    second_card["calibration"] = {"method": "temperature", "temperature": 3.0}
    second_card["inference"] = {"tta": 1}
    torch.manual_seed(1)
    second_model = load_bundle(tiny_bundle).model
    with torch.no_grad():
        for param in second_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = save_ensemble(tmp_path / "ensemble", [(first.model, first.card), (second_model, second_card)],
                         {"operating_threshold": 0.3})
    assert sorted(p.name for p in path.iterdir()) == ["card.json", "member_0", "member_1"]
    ensemble = load_bundle(path)
    assert ensemble.is_ensemble and len(ensemble.members) == 2
    assert ensemble.operating_threshold == 0.3

    images = _sample_images(4)
    single = save_bundle(tmp_path / "second", second_model, second_card)
    expected = (Predictor(first).predict(images) + Predictor.from_path(single).predict(images)) / 2
    np.testing.assert_allclose(Predictor(ensemble).predict(images), expected, atol=1e-6)

    with pytest.raises(ValueError, match="at least 2 members"):
        save_ensemble(tmp_path / "one", [(first.model, first.card)], {})
    other = json.loads(json.dumps(first.card))
    other["class_names"] = list(reversed(other["class_names"]))
    with pytest.raises(ValueError, match="disagree on their classes"):
        save_ensemble(tmp_path / "bad", [(first.model, first.card), (second_model, other)], {})


def test_mil_calibration_needs_enough_validation_slides():
    from pipelines.mil import MIN_CALIBRATION_CASES, fit_bag_calibration

    rng = np.random.default_rng(0)
    few = fit_bag_calibration(rng.normal(size=(6, 2)) * 5, np.array([0, 1, 0, 1, 0, 1]))
    assert few["method"] == "none" and few["temperature"] == 1.0 and "6 validation slides" in few["reason"]
    logits = rng.normal(0, 4, size=(MIN_CALIBRATION_CASES * 4, 2))
    enough = fit_bag_calibration(logits, _sample_labels(logits, 2.0, seed=1))
    assert enough["method"] == "temperature" and enough["temperature"] > 1.0
