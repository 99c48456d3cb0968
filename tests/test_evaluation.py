"""Metrics equal scikit-learn's; the operating threshold reaches its sensitivity; the report is written."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from pipelines.evaluation import (
    choose_operating_threshold,
    compute_metrics,
    expected_calibration_error,
    paired_bootstrap_delta,
    save_plots,
    sensitivity_at_specificity,
    write_report,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT = ["mel", "bcc", "akiec"]


@pytest.fixture
def random_predictions():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 7, size=300)
    logits = rng.normal(size=(300, 7)) + 1.5 * np.eye(7)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_metrics_equal_scikit_learn(random_predictions):
    y, probs = random_predictions
    m = compute_metrics(y, probs, CLASSES, MALIGNANT)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    f1 = f1_score(y, pred, average=None)
    assert [m["per_class"][c]["f1"] for c in CLASSES] == pytest.approx(list(f1))
    y_mal = np.isin(y, [0, 1, 4])
    assert m["malignant_auc"] == pytest.approx(roc_auc_score(y_mal, probs[:, [0, 1, 4]].sum(1)))


def test_sensitivity_at_specificity_and_ece_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    # at >= 75 % specificity (<= 1 false positive of 4) the best threshold 0.7 catches both positives
    assert sensitivity_at_specificity(y, s, 0.75) == 1.0
    assert sensitivity_at_specificity(y, s, 1.0) == 0.5
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    # bins: 0.9 (correct) and 0.6 (wrong): ECE = 0.5*|1-0.9| + 0.5*|0-0.6|
    assert expected_calibration_error(np.array([0, 1]), probs) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)


def test_operating_threshold_reaches_target_sensitivity(random_predictions):
    y, probs = random_predictions
    y_mal = np.isin(y, [0, 1, 4])
    p_mal = probs[:, [0, 1, 4]].sum(1)
    op = choose_operating_threshold(y_mal, p_mal, 0.9)
    assert op["sensitivity"] >= 0.9
    assert (p_mal[y_mal] >= op["threshold"]).mean() == pytest.approx(op["sensitivity"])
    higher = np.unique(p_mal)[np.unique(p_mal) > op["threshold"]].min()
    assert (p_mal[y_mal] >= higher).mean() < 0.9  # the highest threshold that still reaches it
    with pytest.raises(ValueError, match="both malignant and benign"):
        choose_operating_threshold(np.ones(3), np.ones(3))


def test_report_and_plots_are_written(random_predictions, tmp_path):
    y, probs = random_predictions
    m = compute_metrics(y, probs, CLASSES, MALIGNANT, operating_threshold=0.5)
    assert set(save_plots(y, probs, CLASSES, ["mel"], tmp_path)) == {
        "roc.png",
        "confusion_matrix.png",
        "reliability.png",
    }
    report = write_report(m, tmp_path).read_text()
    assert "balanced accuracy" in report and "| df |" in report and "operating threshold" in report
    assert (tmp_path / "report.json").stat().st_size > 100


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected"):
        compute_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"], [])


def test_paired_bootstrap_delta_brackets_the_observed_change(random_predictions):
    y, probs = random_predictions
    same = paired_bootstrap_delta(y, probs, probs, CLASSES, MALIGNANT, n_boot=50)
    assert all(same[k] == {"delta": 0.0, "low": 0.0, "high": 0.0} for k in same)
    rng = np.random.default_rng(0)
    noisy = 0.5 * probs + 0.5 * rng.dirichlet(np.ones(7), size=len(y))  # a clearly worse model
    worse = paired_bootstrap_delta(y, probs, noisy, CLASSES, MALIGNANT, n_boot=200)
    bal = worse["balanced_accuracy"]
    expected = balanced_accuracy_score(y, noisy.argmax(1)) - balanced_accuracy_score(y, probs.argmax(1))
    assert bal["delta"] == pytest.approx(expected)
    assert bal["low"] <= bal["delta"] <= bal["high"]
    assert worse["malignant_auc"]["high"] < 0
    with pytest.raises(ValueError, match="300 cases"):
        paired_bootstrap_delta(y, probs, probs[:10], CLASSES, MALIGNANT)


def test_paired_bootstrap_delta_of_several_runs_is_the_mean_of_their_changes(random_predictions):
    y, probs = random_predictions
    rng = np.random.default_rng(1)
    runs = np.stack([0.5 * probs + 0.5 * rng.dirichlet(np.ones(7), size=len(y)) for _ in range(3)])
    mean = paired_bootstrap_delta(y, probs, runs, CLASSES, MALIGNANT, n_boot=100)
    singles = [paired_bootstrap_delta(y, probs, run, CLASSES, MALIGNANT, n_boot=100) for run in runs]
    for key in ("balanced_accuracy", "malignant_auc"):
        assert mean[key]["delta"] == pytest.approx(np.mean([one[key]["delta"] for one in singles]))
        assert mean[key]["low"] <= mean[key]["delta"] <= mean[key]["high"]
    # one run stacked is that run; a run count that does not match the cases is an error
    one = paired_bootstrap_delta(y, probs, runs[:1], CLASSES, MALIGNANT, n_boot=100)
    assert one == singles[0]
    with pytest.raises(ValueError, match="300 cases"):
        paired_bootstrap_delta(y, probs, runs[:, :10], CLASSES, MALIGNANT)
