"""Bootstrap intervals in every report, bundles whose metrics are their own, and the training-image warning."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from pipelines.evaluation import (
    bootstrap_intervals,
    compute_metrics,
    paired_bootstrap_delta,
    stratified_bootstrap_indices,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT = ["mel", "bcc", "akiec"]
FREQUENCIES = np.array([0.05, 0.08, 0.12, 0.02, 0.12, 0.58, 0.03])  # HAM10000-like imbalance


def predictions(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels (every class present) and informative but imperfect probabilities."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(len(CLASSES)), rng.choice(len(CLASSES), size=n - len(CLASSES), p=FREQUENCIES)])
    logits = rng.normal(size=(n, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[y]
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def width(interval: dict[str, float]) -> float:
    return interval["high"] - interval["low"]


def assert_close(a, b, where: str = "") -> None:
    """Nested dicts of numbers equal to 1e-6."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (int, float)):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------------ the intervals


def test_intervals_contain_the_point_estimates():
    y, probs = predictions(400)
    point = compute_metrics(y, probs, CLASSES, MALIGNANT, operating_threshold=0.3)
    ci = bootstrap_intervals(y, probs, CLASSES, MALIGNANT, operating_threshold=0.3, n_boot=500)
    assert (ci["n_boot"], ci["seed"], ci["confidence"]) == (500, 0, 0.95)
    assert ci["balanced_accuracy"]["low"] <= point["balanced_accuracy"] <= ci["balanced_accuracy"]["high"]
    assert ci["malignant_auc"]["low"] <= point["malignant_auc"] <= ci["malignant_auc"]["high"]
    at = point["at_operating_threshold"]
    assert ci["sensitivity_at_threshold"]["low"] <= at["sensitivity"] <= ci["sensitivity_at_threshold"]["high"]
    assert ci["specificity_at_threshold"]["low"] <= at["specificity"] <= ci["specificity_at_threshold"]["high"]
    assert set(ci["recall"]) == set(CLASSES)
    for name in CLASSES:
        assert ci["recall"][name]["low"] <= point["per_class"][name]["recall"] <= ci["recall"][name]["high"]
    assert width(ci["balanced_accuracy"]) > 0.02  # a real spread, not a degenerate [x, x]


def test_vectorised_intervals_equal_scikit_learn_on_the_same_resamples():
    y, probs = predictions(150)
    ci = bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=60, seed=3)
    y_mal = np.isin(np.asarray(CLASSES)[y], MALIGNANT)
    p_mal = probs[:, [CLASSES.index(c) for c in MALIGNANT]].sum(1)
    bal, auc = [], []
    for idx in stratified_bootstrap_indices(y, 60, seed=3):
        bal.append(balanced_accuracy_score(y[idx], probs[idx].argmax(1)))
        auc.append(roc_auc_score(y_mal[idx], p_mal[idx]))
    assert ci["balanced_accuracy"]["low"] == pytest.approx(np.percentile(bal, 2.5))
    assert ci["balanced_accuracy"]["high"] == pytest.approx(np.percentile(bal, 97.5))
    assert ci["malignant_auc"]["low"] == pytest.approx(np.percentile(auc, 2.5))
    assert ci["malignant_auc"]["high"] == pytest.approx(np.percentile(auc, 97.5))


def test_intervals_narrow_as_the_test_set_grows():
    small = bootstrap_intervals(*predictions(150), CLASSES, MALIGNANT, n_boot=300)
    large = bootstrap_intervals(*predictions(3000), CLASSES, MALIGNANT, n_boot=300)
    for key in ("balanced_accuracy", "malignant_auc"):
        assert width(large[key]) < 0.5 * width(small[key]), key
    assert width(large["recall"]["nv"]) < 0.5 * width(small["recall"]["nv"])


def test_intervals_repeat_with_the_seed_and_differ_with_another():
    y, probs = predictions(300)
    first = bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=600, seed=11)  # more than one chunk
    assert bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=600, seed=11) == first
    assert bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=600, seed=12) != first
    assert np.array_equal(stratified_bootstrap_indices(y, 600, 11), stratified_bootstrap_indices(y, 600, 11))


def test_stratified_resamples_keep_every_class_with_its_count():
    y, probs = predictions(200)
    y[np.flatnonzero(y == CLASSES.index("df"))[1:]] = CLASSES.index("nv")  # dermatofibroma: a single image
    assert (y == CLASSES.index("df")).sum() == 1
    idx = stratified_bootstrap_indices(y, 400, seed=0)
    assert idx.shape == (400, 200)
    assert (y[idx] == y).all()  # every resample has every class, each with its own count
    # a plain bootstrap would lose the single df image in about a third of the resamples
    assert np.mean([(y[row] == 3).any() for row in np.random.default_rng(0).integers(0, 200, (400, 200))]) < 0.8
    ci = bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=400)
    assert set(ci["recall"]) == set(CLASSES)


def test_interval_options_are_checked():
    y, probs = predictions(50)
    assert bootstrap_intervals(y, probs, CLASSES, MALIGNANT, n_boot=0) is None
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals(y, probs, CLASSES, MALIGNANT, confidence=95)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_intervals(y, probs[:, :3], CLASSES, MALIGNANT)
    with pytest.raises(ValueError, match="at least 1 resample"):
        stratified_bootstrap_indices(y, -1)


def test_paired_bootstrap_is_general_and_names_its_malignant_classes():
    assert inspect.signature(paired_bootstrap_delta).parameters["malignant_classes"].default is inspect._empty
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    ref = np.stack([1 - (0.3 + 0.4 * y), 0.3 + 0.4 * y], 1)
    new = 0.5 * ref + 0.5 * rng.dirichlet(np.ones(2), size=120)
    delta = paired_bootstrap_delta(y, ref, new, ["benign", "malignant"], ["malignant"], n_boot=200)
    assert delta["malignant_auc"]["high"] < 0 and delta["malignant_auc"]["delta"] < 0
    with pytest.raises(ValueError, match="malignant"):
        paired_bootstrap_delta(y, ref, new, ["benign", "malignant"], ["mel"], n_boot=10)


# ------------------------------------------------------------------------------------- the model card in the app


def test_app_card_shows_the_bundles_own_numbers_with_intervals_and_never_the_sources():
    from app.wording import card_markdown

    own = {"n": 143, "balanced_accuracy": 0.177, "malignant_auc": 0.726,
           "at_operating_threshold": {"threshold": 0.2, "sensitivity": 0.81, "specificity": 0.4},
           "intervals": {"balanced_accuracy": {"low": 0.121, "high": 0.236},
                         "malignant_auc": {"low": 0.641, "high": 0.804},
                         "sensitivity_at_threshold": {"low": 0.66, "high": 0.93}}}
    source = {"n": 143, "balanced_accuracy": 0.657, "malignant_auc": 0.867}
    card = {"class_names": CLASSES, "malignant_classes": MALIGNANT, "operating_threshold": 0.2,
            "metrics": {"test": own}, "source_metrics": {"bundle_sha256": "ab" * 32, "test": source}}
    text = card_markdown("pruned", card)
    assert "AUC 0.73 (95 % interval 0.64–0.80)" in text
    assert "(balanced accuracy) 18 % (95 % interval 12–24 %)" in text
    assert "on the test images 81 % (95 % interval 66–93 %)" in text
    assert "0.87" not in text and "66 %" not in text  # the source's AUC and balanced accuracy


# --------------------------------------------------------------------------------------- bundles and reports


def test_training_report_and_card_carry_intervals(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text())
    for split in ("validation", "test"):
        ci = card["metrics"][split]["intervals"]
        assert ci["balanced_accuracy"]["low"] <= card["metrics"][split]["balanced_accuracy"] <= \
            ci["balanced_accuracy"]["high"]
    report = (tiny_bundle.parent / "report" / "report.md").read_text()
    assert "- **balanced accuracy**: " in report and "recall 95 % interval" in report
    assert "stratified by class (1000 resamples, seed 0)" in report
    assert "intervals" in json.loads((tiny_bundle.parent / "report" / "report.json").read_text())["metrics"]


def test_pruned_card_metrics_are_what_evaluating_it_gives_and_source_metrics_hold_the_source(
        tiny_bundle, small_manifest, tmp_path):
    from app.wording import card_markdown
    from pipelines.evaluation import card_metrics, evaluate_bundle
    from pipelines.pruning import load_pruning_config, prune_bundle

    settings = load_pruning_config({"steps": 1, "fine_tune_epochs": 1, "max_steps_per_epoch": 1, "speed_runs": 1,
                                    "calibration_per_class": 2, "batchnorm_images": 8, "round_to": 1,
                                    "flops_reduction": 0.3, "bootstrap": 200})
    report = prune_bundle(tiny_bundle, small_manifest, tmp_path / "pruned", settings)
    source = json.loads((tiny_bundle / "card.json").read_text())
    card = json.loads((tmp_path / "pruned" / "card.json").read_text())
    assert set(card["metrics"]) == {"validation", "test"}  # no unpruned or second "pruned" block
    evaluated = card_metrics(evaluate_bundle(tmp_path / "pruned", small_manifest, tmp_path / "eval", n_boot=200))
    own = card["metrics"]["test"]
    for key in ("n", "accuracy", "balanced_accuracy", "malignant_auc", "ece", "recall", "at_operating_threshold",
                "intervals"):
        assert_close(evaluated[key], own[key], key)
    shipped = source["metrics"]
    weights = hashlib.sha256((tiny_bundle / "weights.safetensors").read_bytes()).hexdigest()
    assert card["source_metrics"]["bundle_sha256"] == weights == report["source_bundle_sha256"]
    assert card["source_metrics"]["validation"] == shipped["validation"]
    assert card["source_metrics"]["test"] == shipped["test"]
    # The report's before/after columns are the two bundles as served: before is what evaluating the source gives.
    before = evaluate_bundle(tiny_bundle, small_manifest, tmp_path / "eval_source", n_boot=200)
    assert report["before"]["accuracy"]["balanced_accuracy"] == pytest.approx(before["balanced_accuracy"])
    assert report["after"]["accuracy"]["balanced_accuracy"] == pytest.approx(own["balanced_accuracy"])
    change = report["delta"]["malignant_auc"]
    assert change["low"] <= change["delta"] <= change["high"]
    assert change["delta"] == pytest.approx(own["malignant_auc"] - before["malignant_auc"])
    assert "95 % paired bootstrap" in (tmp_path / "pruned" / "pruning_report.md").read_text()
    # The app's card shows the pruned bundle's own numbers and interval.
    auc = own["intervals"]["malignant_auc"]
    assert (f"AUC {own['malignant_auc']:.2f} (95 % interval {auc['low']:.2f}–{auc['high']:.2f})"
            in card_markdown("pruned", card))


@pytest.fixture
def run_copy(tiny_bundle: Path, small_manifest: Path, tmp_path: Path) -> Path:
    """The tiny bundle in a run directory next to the manifest it was trained on (as `lesionlab run` leaves it)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "bundle")
    shutil.copy(small_manifest, run / "manifest.csv")
    return run


def image_folder(rows: pd.DataFrame, folder: Path) -> Path:
    """A class-per-folder copy of `rows`' images."""
    for path, label in zip(rows.path, rows.label):
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / label / Path(path).name)
    return folder


def test_evaluating_training_images_warns_with_their_count(tiny_bundle, small_manifest, run_copy, tmp_path, caplog):
    from pipelines.cli import main
    from pipelines.manifest import read_manifest

    manifest = read_manifest(small_manifest)
    n_train = int((manifest.split == "train").sum())
    caplog.set_level(logging.INFO)
    out = tmp_path / "on_train"
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--split", "train",
                 "--out", str(out)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "train" in r.getMessage()]
    assert any(f"{n_train} of the {n_train} evaluated images were used to train" in m for m in warned), warned
    assert f"Warning: {n_train} of the {n_train} evaluated images were used to train this bundle" in (
        out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["training_overlap"]["training_images"] == n_train

    caplog.clear()
    out = tmp_path / "on_test"
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--out", str(out)]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "to train" in r.getMessage()]
    n_test = int((manifest.split == "test").sum())
    assert f"None of the {n_test} evaluated images is a training image" in (out / "report.md").read_text()

    # A folder of images (copied elsewhere), found through the training manifest beside the bundle.
    mixed = pd.concat([manifest[manifest.split == "train"].head(3), manifest[manifest.split == "test"].head(2)])
    caplog.clear()
    out = tmp_path / "folder"
    folder = image_folder(mixed, tmp_path / "mixed")
    assert main(["evaluate", "--bundle", str(run_copy / "bundle"), "--data", str(folder), "--out", str(out)]) == 0
    assert any("3 of the 5 evaluated images were used to train" in r.getMessage() for r in caplog.records)
    assert "Warning: 3 of the 5" in (out / "report.md").read_text()
    caplog.clear()
    disjoint = image_folder(manifest[manifest.split == "test"].head(4), tmp_path / "held_out")
    assert main(["evaluate", "--bundle", str(run_copy / "bundle"), "--data", str(disjoint),
                 "--out", str(tmp_path / "disjoint")]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "to train" in r.getMessage()]


def test_a_bundle_copied_alone_still_knows_its_training_images(tiny_bundle, small_manifest, tmp_path, caplog):
    """Without its manifest beside it (as models/default_bundle ships), the bundle's training_images.csv tells."""
    from pipelines.cli import main
    from pipelines.manifest import read_manifest

    alone = tmp_path / "shipped" / "bundle"
    shutil.copytree(tiny_bundle, alone)
    assert (alone / "training_images.csv").is_file()
    manifest = read_manifest(small_manifest)
    mixed = pd.concat([manifest[manifest.split == "train"].head(4), manifest[manifest.split == "val"].head(3)])
    folder = image_folder(mixed, tmp_path / "elsewhere")
    caplog.set_level(logging.INFO)
    assert main(["evaluate", "--bundle", str(alone), "--data", str(folder), "--out", str(tmp_path / "r")]) == 0
    assert any("4 of the 7 evaluated images were used to train" in r.getMessage() for r in caplog.records)
    names = set(pd.read_csv(alone / "training_images.csv").name)
    assert names == {Path(p).stem for p in manifest[manifest.split == "train"].path}


def test_balancing_on_the_bundles_training_images_warns_and_keeps_the_source_apart(run_copy, tmp_path, caplog):
    from pipelines.balancing import balance_bundle
    from pipelines.manifest import read_manifest, write_manifest

    manifest = read_manifest(run_copy / "manifest.csv")
    swapped = manifest.copy()
    swapped.loc[manifest.split == "train", "split"] = "val"  # the bundle's training images now choose thresholds
    swapped.loc[manifest.split == "val", "split"] = "train"
    write_manifest(swapped, tmp_path / "swapped.csv")
    caplog.set_level(logging.WARNING)
    report = balance_bundle(run_copy / "bundle", tmp_path / "swapped.csv", tmp_path / "balanced",
                            {"method": "none", "head_epochs": 2, "bootstrap": 100})
    n_train, scored = int((manifest.split == "train").sum()), int((swapped.split != "train").sum())
    assert any(f"{n_train} of the {scored} validation and test images were used to train" in r.getMessage()
               for r in caplog.records)
    assert report["training_overlap"]["training_images"] == n_train
    assert f"Warning: {n_train} of the {scored}" in Path(report["report"]).read_text()
    card = json.loads((tmp_path / "balanced" / "card.json").read_text())
    source = json.loads((run_copy / "bundle" / "card.json").read_text())
    assert set(card["metrics"]) == {"validation", "test"} and "intervals" in card["metrics"]["test"]
    assert card["source_metrics"]["test"] == source["metrics"]["test"]
    assert card["source_metrics"]["bundle_sha256"] == hashlib.sha256(
        (run_copy / "bundle" / "weights.safetensors").read_bytes()).hexdigest()
    change = report["metrics"]["val"]["change"]["balanced_accuracy"]
    assert change["low"] <= change["delta"] <= change["high"]
    assert "change [95 % paired interval]" in Path(report["report"]).read_text()


def test_ensemble_card_keeps_its_own_metrics_and_its_members_apart(tiny_bundle, small_manifest, tmp_path):
    from pipelines.ensemble import build_ensemble

    card = build_ensemble([tiny_bundle, tiny_bundle], small_manifest, tmp_path / "ensemble", n_boot=100)
    assert set(card["metrics"]) == {"validation", "test"} and card["metrics"]["test"]["intervals"]["n_boot"] == 100
    members = card["source_metrics"]["members"]
    source = json.loads((tiny_bundle / "card.json").read_text())
    assert len(members) == 2 and members[0]["test"] == source["metrics"]["test"]
    assert members[0]["bundle_sha256"] == hashlib.sha256((tiny_bundle / "weights.safetensors").read_bytes()).hexdigest()
