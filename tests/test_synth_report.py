"""Synthetic-set report: KID, precision/recall/density/coverage, likely copies, and the `synth-report` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import synthesis as R
from pipelines.cli import main
from pipelines.manifest import read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

CLASS_FIELDS = {"n_real", "n_real_total", "n_synthetic", "n_synthetic_total", "kid", "k", "precision", "recall",
                "density", "coverage", "nearest_real_similarity", "copies", "quality_filter", "contact_sheet", "notes"}


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ----------------------------------------------------------------------------------------------- metric functions


def test_identical_feature_sets_score_as_one_distribution() -> None:
    x = _gaussian(200, 8, seed=0)
    kid = R.kid(x, x)
    assert abs(kid["mean"]) <= 3 * kid["se"] and kid["se"] > 0
    assert kid["subsets"] == 10 and kid["subset_size_real"] == kid["subset_size_synthetic"] == 20
    scores = R.prdc(x, x, k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(1.0)


def test_kid_of_copies_has_the_unbiased_estimators_known_negative_offset() -> None:
    """The estimator assumes independent sets; for identical ones its expectation is -2 (mean k(x,x) - mean k(x,y))
    / n, below zero: a KID several standard errors below 0 hints at synthetic images that copy the real ones."""
    x = _gaussian(200, 64, seed=1)
    kernel = R.polynomial_kernel(x, x)
    on_diagonal = np.trace(kernel) / len(x)
    off_diagonal = (kernel.sum() - np.trace(kernel)) / (len(x) * (len(x) - 1))
    expected = -2 * (on_diagonal - off_diagonal) / len(x)
    kid = R.kid(x, x)
    assert abs(kid["mean"] - expected) <= 3 * kid["se"]
    assert kid["mean"] < -kid["se"]


def test_two_draws_of_one_distribution_give_kid_within_its_standard_error() -> None:
    kid = R.kid(_gaussian(300, 32, seed=2), _gaussian(200, 32, seed=3), seed=4)
    assert abs(kid["mean"]) <= 3 * kid["se"]
    assert (kid["subset_size_real"], kid["subset_size_synthetic"]) == (30, 20)


def test_far_apart_gaussians_have_no_overlap_and_a_large_kid() -> None:
    real, synthetic = _gaussian(120, 16, seed=5), _gaussian(80, 16, seed=6, shift=20.0)
    kid = R.kid(real, synthetic)
    assert kid["mean"] > 50 * kid["se"] and kid["mean"] > 1e3 * abs(R.kid(real, real)["mean"])
    assert R.prdc(real, synthetic, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_half_covered_real_set_gives_half_recall_and_coverage_but_full_precision() -> None:
    """Synthetic images that copy one of two well-separated real clusters: realistic but not diverse."""
    real = np.concatenate([_gaussian(50, 4, seed=7), _gaussian(50, 4, seed=8, shift=30.0)])
    scores = R.prdc(real, real[:50] + 0.01, k=3)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(0.5) and scores["coverage"] == pytest.approx(0.5)


def test_too_few_images_are_refused_with_the_counts() -> None:
    with pytest.raises(ValueError, match="at least 4 images in each set.*3 real"):
        R.kid(_gaussian(3, 4, 0), _gaussian(10, 4, 1))
    with pytest.raises(ValueError, match="more than k images.*5 synthetic"):
        R.prdc(_gaussian(10, 4, 0), _gaussian(5, 4, 1), k=5)
    with pytest.raises(ValueError, match="same number of features"):
        R.prdc(_gaussian(10, 4, 0), _gaussian(10, 5, 1))


def test_nearest_neighbour_similarity_finds_the_copied_reference() -> None:
    references = _gaussian(30, 12, seed=9)
    queries = np.stack([3.0 * references[17], _gaussian(1, 12, seed=10)[0]])  # a scaled copy, then a stranger
    similarity, index = R.nearest_neighbour_similarity(queries, references)
    assert similarity[0] == pytest.approx(1.0) and index[0] == 17
    assert similarity[1] < 0.9


# ------------------------------------------------------------------------------------------------ the full report


def _perturbed(source: str, target: Path, seed: int) -> None:
    """A flipped, noisy version of a real image (a different image from any in the manifest's train split)."""
    array = np.asarray(Image.open(source).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 6.0, array.shape)
    Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8)).save(target)


@pytest.fixture(scope="module")
def synthetic_folder(small_manifest: Path, ham_manifest: pd.DataFrame, tmp_path_factory) -> tuple[Path, str]:
    """<class>/<image> for mel and nv, 5 images each: perturbed images that are not training rows of the small
    manifest, except one exact file copy of a mel training image. Returns (folder, the copied training image)."""
    manifest = read_manifest(small_manifest)
    train = manifest[manifest.split == "train"]
    folder = tmp_path_factory.mktemp("synthetic")
    copied = train[train.label == "mel"].path.iloc[0]
    for label in ("mel", "nv"):
        (folder / label).mkdir()
        others = ham_manifest[(ham_manifest.label == label) & ~ham_manifest.path.isin(manifest.path)].path
        for i, source in enumerate(others.head(5)):
            _perturbed(source, folder / label / f"syn_{label}_{i}.png", seed=i)
    (folder / "mel" / "syn_mel_0.png").unlink()
    shutil.copy(copied, folder / "mel" / "syn_mel_copy.jpg")
    return folder, copied


def test_report_flags_the_copied_training_image_and_writes_every_file(
    small_manifest: Path, synthetic_folder: tuple[Path, str], tiny_bundle: Path, tmp_path: Path, capsys
) -> None:
    """The tiny bundle's 16 pooled features put any two lesions above 0.9999 cosine, so the threshold is tight here;
    the Lite0 test below uses the default."""
    folder, copied = synthetic_folder
    out = tmp_path / "report"
    argv = ["synth-report", "--manifest", str(small_manifest), "--synthetic", str(folder), "--out", str(out),
            "--bundle", str(tiny_bundle), "--max-per-class", "12", "--k", "2", "--copy-threshold", "0.99999"]
    assert main(argv) == 0
    assert "report.md" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["classes"]) == {"mel", "nv"}
    for c in report["classes"].values():
        assert set(c) == CLASS_FIELDS
        assert c["n_synthetic"] == 5 and c["n_real"] == c["n_real_total"] > 0
        assert c["kid"]["se"] >= 0 and 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
        assert 0 <= c["coverage"] <= 1 and c["density"] >= 0
        assert (out / c["contact_sheet"]).is_file() and Image.open(out / c["contact_sheet"]).width > 200
        quality = c["quality_filter"]
        assert quality["bundle"] == str(tiny_bundle) and quality["share"] == quality["dropped"] / 5
    mel, nv = report["classes"]["mel"], report["classes"]["nv"]
    assert [item["real"] for item in mel["copies"]["items"]] == [copied]
    assert mel["copies"]["items"][0]["synthetic"].endswith("syn_mel_copy.jpg")
    assert mel["copies"]["items"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert nv["copies"]["count"] == 0 and nv["nearest_real_similarity"]["max"] < 0.99999
    assert report["embedding"]["name"] == str(tiny_bundle)
    assert (out / R.HISTOGRAM_PNG).is_file()
    markdown = (out / "report.md").read_text()
    assert "syn_mel_copy.jpg" in markdown and "| mel | " in markdown and "KID" in markdown


def test_quality_share_is_what_the_synthesis_filter_drops(
    small_manifest: Path, synthetic_folder: tuple[Path, str], tiny_bundle: Path, tmp_path: Path
) -> None:
    """The report runs the generation-time `QualityFilter`: images labelled with the class the bundle predicts are
    kept, images labelled with another class are dropped (the tiny bundle's top probability is above 0.1)."""
    from pipelines.images import load_image
    from pipelines.prediction import Predictor
    from pipelines.synthesis import synthetic_rows_from_folder

    rows = synthetic_rows_from_folder(synthetic_folder[0])
    predictor = Predictor.from_path(tiny_bundle)
    probs = predictor.predict([load_image(p) for p in rows.path])
    assert probs.max(axis=1).min() > 0.1
    names = predictor.class_names
    predicted = probs.argmax(axis=1)
    relabel = [names[p] if i % 2 == 0 else names[(p + 1) % len(names)] for i, p in enumerate(predicted)]
    rows = rows.assign(label=relabel)
    settings = R.SynthReportConfig(bundle=str(tiny_bundle), embedding=R.SMALL_CNN, quality_confidence=0.1, k=2)
    report = R.synth_report(read_manifest(small_manifest), rows, tmp_path, settings)
    wrong = np.arange(len(rows)) % 2 == 1
    expected = {label: int(wrong[(rows.label == label).to_numpy()].sum()) for label in set(relabel)}
    assert {label: c["quality_filter"]["dropped"] for label, c in report["classes"].items()} == expected
    assert sum(expected.values()) == 5
    assert report["embedding"]["name"] == R.SMALL_CNN


def test_synthetic_manifest_rows_are_judged_and_too_small_classes_are_noted(
    small_manifest: Path, synthetic_folder: tuple[Path, str], tmp_path: Path
) -> None:
    """A manifest as input (its source=synthetic rows); a class with 3 synthetic images gets no KID, said why."""
    from pipelines.manifest import append_train_rows
    from pipelines.synthesis import synthetic_rows_from_folder

    folder, copied = synthetic_folder
    manifest = read_manifest(small_manifest)
    rows = synthetic_rows_from_folder(folder)
    rows = rows[(rows.label == "mel") | rows.path.str.contains("syn_nv_[012]")]
    combined = write_manifest(append_train_rows(manifest, rows), tmp_path / "combined.csv")
    loaded = R.load_synthetic_rows(combined)
    assert len(loaded) == 8 and (loaded.source == "synthetic").all()
    settings = R.SynthReportConfig(embedding=R.SMALL_CNN, k=2, copy_threshold=0.99999)
    report = R.synth_report(manifest, loaded, tmp_path / "out", settings)
    nv = report["classes"]["nv"]
    assert nv["kid"] is None and any("at least 4 images" in note for note in nv["notes"])
    assert nv["precision"] is not None and nv["quality_filter"] is None
    assert [item["real"] for item in report["classes"]["mel"]["copies"]["items"]] == [copied]
    assert "Not computed" in (tmp_path / "out" / "report.md").read_text()


def test_lite0_default_embedding_flags_the_copy(
    small_manifest: Path, synthetic_folder: tuple[Path, str], tmp_path: Path
) -> None:
    """The default embedding: ImageNet EfficientNet-Lite0's 1280 pooled features at 224 px (one class, few images)."""
    from pipelines.synthesis import synthetic_rows_from_folder

    folder, copied = synthetic_folder
    manifest = read_manifest(small_manifest)
    manifest = manifest[manifest.label == "mel"]
    rows = synthetic_rows_from_folder(folder)
    report = R.synth_report(manifest, rows[rows.label == "mel"], tmp_path, R.SynthReportConfig(k=2))
    assert report["embedding"]["name"] == "efficientnet-lite0" and report["embedding"]["dim"] == 1280
    mel = report["classes"]["mel"]
    assert [item["real"] for item in mel["copies"]["items"]] == [copied]  # at the default threshold, 0.95
    assert mel["nearest_real_similarity"]["p95"] < 1.0
    assert mel["copies"]["items"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_unknown_synthetic_class_is_a_one_line_error(small_manifest: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "syn" / "not-a-class").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "syn" / "not-a-class" / "a.png")
    argv = ["synth-report", "--manifest", str(small_manifest), "--synthetic", str(tmp_path / "syn"), "--out",
            str(tmp_path / "out"), "--embedding", R.SMALL_CNN]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "['not-a-class'] have no real training images" in error


def test_an_out_of_range_setting_is_a_one_line_error(small_manifest: Path, tmp_path: Path, capsys) -> None:
    argv = ["synth-report", "--manifest", str(small_manifest), "--synthetic", str(tmp_path), "--out",
            str(tmp_path / "out"), "--max-per-class", "2"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--max-per-class: Input should be greater than or equal to 4" in error
