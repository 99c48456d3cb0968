"""Class-imbalance toolkit: losses, samplers, SMOTE family + leakage guard, threshold moving, re-balanced bundles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pipelines.balancing import (
    FEATURE_METHODS,
    FeatureResampler,
    apply_prior_correction,
    load_balancing_config,
    oversample_split,
    pixel_smote,
    prior_corrected_probs,
    run_balancing_stage,
    target_counts,
)
from pipelines.config import BalancingConfig, ConfigError, RunConfig
from pipelines.manifest import ManifestError, append_train_rows, grouped_split, ingest_ham10000, write_manifest
from pipelines.training import build_loss, build_sampler, class_weights

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ham10000_sample"

# A tiny batch: 3 samples, 3 classes, targets (0, 1, 1); training counts (10, 30, 60).
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
TARGETS = torch.tensor([0, 1, 1])
COUNTS = [10, 30, 60]
# -log softmax(logits)[target], by hand: log(1 + e^-2 + e^-3), log(1 + e^-1 + e^-1.5), log(2 + e^3).
NLL = [math.log(1 + math.exp(-2) + math.exp(-3)), math.log(1 + math.exp(-1) + math.exp(-1.5)),
       math.log(2 + math.exp(3))]


# ---------------------------------------------------------------------------------------------------------- losses


def test_nll_constants_are_what_the_comment_says() -> None:
    assert NLL == pytest.approx([0.16984602, 0.46436878, 3.09492296], abs=1e-7)


def test_inverse_and_effective_number_weights_match_hand_values() -> None:
    # inverse: 1/n = (0.1, 0.0333, 0.0167), mean 0.05 -> (2, 2/3, 1/3)
    assert class_weights(COUNTS, "inverse").tolist() == pytest.approx([2.0, 2 / 3, 1 / 3], rel=1e-6)
    # effective (β = 0.9): (1-β)/(1-β^n) = (0.15354, 0.10443, 0.10018), divided by their mean 0.11938
    assert class_weights(COUNTS, "effective", beta=0.9).tolist() == pytest.approx([1.28609, 0.87474, 0.83917],
                                                                                  abs=1e-5)
    with pytest.raises(ValueError, match="at least one training sample"):
        class_weights([5, 0, 3], "inverse")


def test_plain_and_class_weighted_cross_entropy_match_hand_values() -> None:
    plain = build_loss("ce", COUNTS, "none")(LOGITS, TARGETS).item()
    assert plain == pytest.approx(sum(NLL) / 3, abs=1e-6)  # 1.24305
    weighted = build_loss("ce", COUNTS, "inverse")(LOGITS, TARGETS).item()
    # Σ w_y · nll / Σ w_y with w = (2, 2/3, 1/3) and y = (0, 1, 1)
    expected = (2 * NLL[0] + 2 / 3 * NLL[1] + 2 / 3 * NLL[2]) / (2 + 2 / 3 + 2 / 3)
    assert weighted == pytest.approx(expected, abs=1e-6)
    assert weighted == pytest.approx(0.81377, abs=1e-5)


def test_focal_loss_matches_hand_value_and_reduces_to_ce_at_gamma_zero() -> None:
    focal = build_loss("focal", COUNTS, "none", gamma=2.0)(LOGITS, TARGETS).item()
    expected = sum((1 - math.exp(-n)) ** 2 * n for n in NLL) / 3  # mean of (1 - p_t)^2 · (-log p_t)
    assert focal == pytest.approx(expected, abs=1e-6)
    assert focal == pytest.approx(0.96307, abs=1e-5)
    assert build_loss("focal", COUNTS, "none", gamma=0.0)(LOGITS, TARGETS).item() == pytest.approx(sum(NLL) / 3,
                                                                                                    abs=1e-6)


def test_logit_adjusted_loss_matches_hand_value() -> None:
    loss = build_loss("logit-adjusted", COUNTS, "none", tau=1.0)(LOGITS, TARGETS).item()
    priors = [n / 100 for n in COUNTS]
    adjusted = (LOGITS + torch.log(torch.tensor(priors))).tolist()
    expected = sum(
        -row[t] + math.log(sum(math.exp(v) for v in row)) for row, t in zip(adjusted, TARGETS.tolist(), strict=True)
    ) / 3
    assert loss == pytest.approx(expected, abs=1e-6)
    assert loss == pytest.approx(1.56986, abs=1e-5)
    with pytest.raises(ValueError, match="every class"):
        build_loss("logit-adjusted", [5, 0, 3])


# -------------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("mode", ["balanced", "sqrt"])
def test_sampler_epoch_draws_classes_in_expected_proportions(mode: str) -> None:
    from scipy.stats import chisquare

    counts = np.array([1500, 300, 60])
    labels = np.repeat(np.arange(3), counts)
    sampler = build_sampler(labels.tolist(), 3, mode, seed=0)
    assert len(sampler) == len(labels)
    drawn = np.bincount(labels[np.fromiter(iter(sampler), dtype=np.int64)], minlength=3)
    mass = np.ones(3) if mode == "balanced" else np.sqrt(counts)
    expected = mass / mass.sum() * len(labels)
    assert chisquare(drawn, expected).pvalue > 0.001
    assert np.abs(drawn - expected).max() < 5 * np.sqrt(expected).max()
    # The natural frequencies (1500, 300, 60) would be rejected outright.
    assert chisquare(drawn, counts).pvalue < 1e-6
    assert build_sampler(labels.tolist(), 3, "none") is None


# ------------------------------------------------------------------------------------------ SMOTE and leakage guard


def _embedding_table(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows like a manifest's (train 60/12/6, val and test 5/3/2) with 8-d Gaussian embeddings per class."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for split, sizes in (("train", (60, 12, 6)), ("val", (5, 3, 2)), ("test", (5, 3, 2))):
        for label, n in zip(("nv", "mel", "df"), sizes, strict=True):
            for i in range(n):
                rows.append({"image_id": f"{split}-{label}-{i}", "path": f"/x/{split}-{label}-{i}.jpg",
                             "label": label, "group": f"g-{split}-{label}-{i}", "split": split, "source": "real"})
                feats.append(rng.normal({"nv": 0.0, "mel": 2.0, "df": -2.0}[label], 1.0, 8))
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


def test_target_counts_never_shrinks_a_class() -> None:
    assert target_counts({"nv": 60, "mel": 12, "df": 6}, 0.5) == {"nv": 60, "mel": 30, "df": 30}
    assert target_counts({"nv": 60, "mel": 40}, 0.5) == {"nv": 60, "mel": 40}
    with pytest.raises(ValueError, match="target_ratio"):
        target_counts({"nv": 60}, 1.5)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_smote_reaches_requested_ratio_and_only_training_rows_grow(ratio: float) -> None:
    rows, feats = _embedding_table()
    new_rows, new_feats = oversample_split(rows, feats, FeatureResampler("smote", ratio, 5, seed=0))
    train = new_rows[new_rows.split == "train"]
    expected = {"nv": 60, **{c: max(n, math.ceil(ratio * 60)) for c, n in (("mel", 12), ("df", 6))}}
    assert train.label.value_counts().to_dict() == expected
    assert (new_rows.source == "synthetic").sum() == sum(expected.values()) - 78
    assert set(new_rows.loc[new_rows.source == "synthetic", "split"]) == {"train"}
    # Every original row, held-out ones included, is still there, unchanged, in its place, with its embedding.
    pd.testing.assert_frame_equal(new_rows.iloc[: len(rows)], rows)
    assert new_feats[: len(rows)].tobytes() == feats.tobytes()
    held = (rows.split != "train").to_numpy()
    assert new_feats[: len(rows)][held].tobytes() == feats[held].tobytes()
    # Synthetic mel/df embeddings are interpolations, so they stay in their class's region.
    synthetic = new_rows.source == "synthetic"
    mel = new_feats[len(rows):][new_rows.label[synthetic].to_numpy() == "mel"]
    assert mel.mean() > 1.0


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_smote_family_method_touches_training_rows_only(method: str) -> None:
    rows, feats = _embedding_table(1)
    new_rows, new_feats = oversample_split(rows, feats, FeatureResampler(method, 1.0, 5, seed=0))
    for split in ("val", "test"):
        before, after = rows[rows.split == split], new_rows[new_rows.split == split]
        assert before.to_csv(index=False) == after.reset_index(drop=True).to_csv(index=False)
        assert feats[(rows.split == split).to_numpy()].tobytes() == new_feats[(new_rows.split == split).to_numpy()
                                                                              ].tobytes()
    grown = new_rows[new_rows.split == "train"].label.value_counts()
    assert grown["df"] > 6 and grown["mel"] > 12


def test_guard_refuses_to_resample_a_held_out_split() -> None:
    rows, feats = _embedding_table()
    for split in ("val", "test"):
        with pytest.raises(ValueError, match="training split only"):
            oversample_split(rows, feats, FeatureResampler("smote"), split=split)
    with pytest.raises(ValueError, match="training split only"):
        pixel_smote(rows, "/nonexistent", {"space": "pixel"}, split="val")
    added = rows[rows.split == "val"].head(2).assign(source="synthetic")
    with pytest.raises(ManifestError, match="split=train"):
        append_train_rows(rows, added)


# ---------------------------------------------------------------------------------------------- threshold moving


def test_prior_correction_in_the_head_equals_dividing_probabilities_by_the_prior() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    x = torch.randn(20, 4)
    priors = np.array([0.7, 0.2, 0.1])
    with torch.no_grad():
        before = torch.softmax(head(x), 1).numpy()
        apply_prior_correction(head, priors, tau=1.0)
        after = torch.softmax(head(x), 1).numpy()
    expected = before / priors
    np.testing.assert_allclose(after, expected / expected.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(prior_corrected_probs(before, priors), after, atol=1e-5)
    # The rare class wins more often after correction; a uniform prior changes nothing.
    assert (after.argmax(1) == 2).sum() >= (before.argmax(1) == 2).sum()
    np.testing.assert_allclose(prior_corrected_probs(before, [1, 1, 1]), before, atol=1e-6)


def test_config_rejects_large_pixel_smote_and_unknown_fields() -> None:
    assert load_balancing_config(None) == BalancingConfig()
    with pytest.raises(ConfigError, match="at most 64 px"):
        load_balancing_config({"space": "pixel", "pixel_size": 96})
    with pytest.raises(ConfigError, match="pixel-space resampling supports"):
        load_balancing_config({"space": "pixel", "method": "smote-tomek"})
    with pytest.raises(ConfigError, match="balancing.ratio"):
        load_balancing_config({"ratio": 0.5})


# ------------------------------------------------------------------------------------ real sample images: manifests


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grouped split of 84 embedded sample images (12 per class) written as a manifest CSV."""
    df = ingest_ham10000(SAMPLE)
    df = df.groupby("label", group_keys=False).head(12).reset_index(drop=True)
    df = grouped_split(df, 0.25, 0.25, seed=0)
    return write_manifest(df, tmp_path_factory.mktemp("manifest") / "manifest.csv")


def test_pixel_smote_appends_train_rows_and_keeps_held_out_rows_byte_identical(small_manifest: Path,
                                                                                tmp_path: Path) -> None:
    from pipelines.manifest import read_manifest

    manifest = read_manifest(small_manifest)
    # Make it imbalanced: keep every nv training row, 3 of each other class.
    train = manifest[manifest.split == "train"]
    drop = train[train.label != "nv"].groupby("label").apply(lambda g: g.iloc[3:], include_groups=False).index
    manifest = manifest.drop(index=[i for _, i in drop]).reset_index(drop=True)
    before_path = write_manifest(manifest, tmp_path / "before.csv")
    out, report = pixel_smote(manifest, tmp_path / "pix", {"space": "pixel", "pixel_size": 24, "seed": 3,
                                                           "k_neighbors": 2})
    after_path = write_manifest(out, tmp_path / "after.csv")
    counts = out[out.split == "train"].label.value_counts()
    assert counts.nunique() == 1, counts  # every class now has as many training rows as nv
    assert report["synthetic_images"] == int((out.source == "synthetic").sum()) > 0
    before_lines = before_path.read_bytes().splitlines()
    after_lines = after_path.read_bytes().splitlines()
    assert after_lines[: len(before_lines)] == before_lines  # header and every original row, byte for byte
    assert set(out.split[len(manifest):]) == {"train"}
    image = Image.open(out.path.iloc[-1])
    assert image.size == (24, 24)
    sheet = Image.open(report["contact_sheet"])
    assert sheet.size[0] > 8 * 48 and sheet.size[1] >= 6 * 48  # 6 grown classes, up to 8 samples each at 2x
    # Synthetic pixels lie between real ones: not blank, not noise.
    assert 20 < np.asarray(image).mean() < 245


# ------------------------------------------------------------------------------- feature-space SMOTE on a bundle


@pytest.fixture(scope="module")
def tiny_run(small_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding the manifest and a small-CNN bundle (random weights, 32 px) to re-balance."""
    from models.bundle import save_bundle
    from models.registry import HALF_NORMALIZATION, build_model
    from pipelines.manifest import class_names_of, read_manifest

    run_dir = tmp_path_factory.mktemp("run")
    manifest = read_manifest(small_manifest)
    write_manifest(manifest, run_dir / "manifest.csv")
    torch.manual_seed(0)
    classes = class_names_of(manifest)
    model = build_model("small-cnn", len(classes), 32, widths=(8, 16))
    card = {"task": "image", "architecture": {"name": "small-cnn", "kwargs": {"widths": [8, 16]}},
            "class_names": classes, "malignant_classes": ["mel", "bcc", "akiec"], "input_size": 32,
            "normalization": HALF_NORMALIZATION, "operating_threshold": 0.5}
    save_bundle(run_dir / "bundle", model, card)
    return run_dir


def test_feature_space_smote_bundle_differs_from_the_original_only_in_the_head(tiny_run: Path) -> None:
    from models.bundle import load_bundle
    from pipelines.data import ImageDataset
    from pipelines.manifest import read_manifest
    from pipelines.prediction import Predictor
    from pipelines.transforms import eval_transform

    config = RunConfig(balancing={"method": "smote", "head_epochs": 4, "k_neighbors": 3, "prior_correction": True})
    outputs = run_balancing_stage(config, tiny_run, tiny_run / "manifest.csv")
    assert outputs.report.is_file() and "| df |" in outputs.report.read_text()
    original, balanced = load_bundle(tiny_run / "bundle"), load_bundle(outputs.bundle)
    assert balanced.card["balancing"]["method"] == "smote"
    after = balanced.card["balancing"]["train_counts_after"]
    assert len(set(after.values())) == 1  # every class as large as the largest
    assert balanced.card["operating_threshold"] is not None
    # A new head is a new model: its calibration is re-fitted on validation (the source bundle had none).
    assert balanced.card["calibration"]["method"] == "temperature"
    assert balanced.card["calibration"]["fitted_on"].startswith("validation")
    assert balanced.card["inference"] == {"tta": 1}  # the source bundle's own setting (it predates TTA)

    a = load_file(tiny_run / "bundle" / "weights.safetensors")
    b = load_file(outputs.bundle / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("head."):
            assert not torch.equal(a[key], b[key]), key
        else:
            assert torch.equal(a[key], b[key]), key

    manifest = read_manifest(tiny_run / "manifest.csv")
    test_rows = manifest[manifest.split == "test"]
    dataset = ImageDataset(test_rows, original.class_names, eval_transform(32, **original.card["normalization"]))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        features = original.model.forward_features(x)
        assert torch.equal(features, balanced.model.forward_features(x))
        assert torch.allclose(balanced.model(x), balanced.model.head(features), atol=1e-6)
        assert not torch.allclose(original.model(x), balanced.model(x))
    # The re-balanced bundle serves through the same predictor as any other bundle.
    table, errors = Predictor(balanced).predict_files(test_rows.path.tolist())
    assert not errors and len(table) == len(test_rows)


def test_cli_balance_writes_a_bundle_and_rejects_a_missing_bundle(tiny_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    out = tmp_path / "balanced"
    code = main(["balance", "--bundle", str(tiny_run / "bundle"), "--manifest", str(tiny_run / "manifest.csv"),
                 "--method", "borderline-smote", "--ratio", "0.5", "--head-epochs", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "card.json").is_file() and (out / "balancing_report" / "report.md").is_file()
    assert main(["balance", "--manifest", str(tiny_run / "manifest.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "--bundle is required" in capsys.readouterr().err
