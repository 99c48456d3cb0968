"""Metrics that matter under imbalance, the validation-chosen operating threshold, plots and the run report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

log = logging.getLogger(__name__)

# The scalar metrics a report lists first and a model card keeps.
HEADLINE_METRICS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_auc",
    "malignant_auc",
    "sensitivity_at_80_specificity",
    "sensitivity_at_90_specificity",
    "ece",
)


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a model card shows (no confusion matrix)."""
    keep = (*HEADLINE_METRICS, "at_operating_threshold", "ece_uncalibrated")
    headline = {k: metrics[k] for k in keep if k in metrics}
    headline["recall"] = {name: row["recall"] for name, row in metrics.get("per_class", {}).items()}
    return headline


def malignant_probability(
    probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str]
) -> np.ndarray:
    """P(malignant) = sum of the malignant classes' probabilities."""
    unknown = sorted(set(malignant_classes) - set(class_names))
    if unknown:
        raise ValueError(f"malignant classes {unknown} are not among the model's classes {list(class_names)}")
    columns = [list(class_names).index(c) for c in malignant_classes]
    return probs[:, columns].sum(axis=1)


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among ROC points whose specificity is at least `specificity`."""
    fpr, tpr, _ = roc_curve(y_true, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            bins.append(
                {
                    "low": low,
                    "high": high,
                    "count": int(in_bin.sum()),
                    "accuracy": float(correct[in_bin].mean()),
                    "confidence": float(confidence[in_bin].mean()),
                }
            )
    return bins


def macro_ovr_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have both positives and negatives."""
    aucs = [
        roc_auc_score(y_true == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y_true == c).sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def choose_operating_threshold(
    y_malignant: np.ndarray, p_malignant: np.ndarray, target_sensitivity: float = 0.9
) -> dict[str, float]:
    """The highest threshold on P(malignant) whose sensitivity reaches the target (referral rule: p >= t)."""
    y = np.asarray(y_malignant).astype(bool)
    p = np.asarray(p_malignant, dtype=np.float64)
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("choosing an operating threshold needs both malignant and benign validation images")
    best = None
    for t in np.unique(p)[::-1]:
        sensitivity = float((p[y] >= t).mean())
        if sensitivity >= target_sensitivity:
            best = float(t)
            break
    if best is None:
        best = float(p.min())
    predicted = p >= best
    return {
        "threshold": best,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(predicted[y].mean()),
        "specificity": float((~predicted[~y]).mean()),
    }


def referral_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant: Sequence[str],
    target_sensitivity: float,
) -> dict[str, float] | None:
    """The referral threshold on P(malignant) chosen on (calibrated) validation probabilities for the target
    sensitivity; None when no malignant class is known or the split lacks malignant or benign images."""
    present = [c for c in malignant if c in class_names]
    if not present:
        return None
    y_mal = np.isin(np.asarray(class_names)[np.asarray(labels)], present)
    if y_mal.all() or not y_mal.any():
        log.warning("validation split lacks malignant or benign images; no operating threshold chosen")
        return None
    return choose_operating_threshold(y_mal, malignant_probability(probs, class_names, present), target_sensitivity)


def paired_bootstrap_delta(
    y_true: Sequence[int],
    probs_ref: np.ndarray,
    probs_new: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str] = ("mel", "bcc", "akiec"),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Change (new - reference) in balanced accuracy and malignant AUC with a 95 % paired bootstrap interval.

    Both models are scored on the same resampled cases, so the interval reflects the difference between them,
    not each model's own sampling noise. Resamples that lose a class (or all malignant/benign cases) are redrawn.
    `probs_new` may also be (runs, cases, classes), e.g. one model trained with several seeds: the change is then
    the mean over runs of each run's change, on every resample.
    """
    y_true = np.asarray(y_true)
    runs_new = probs_new[None] if probs_new.ndim == 2 else probs_new
    if runs_new.ndim != 3 or runs_new.shape[1:] != probs_ref.shape or probs_ref.shape[0] != len(y_true):
        raise ValueError(f"probabilities of shapes {probs_ref.shape} and {probs_new.shape} do not both cover the "
                         f"{len(y_true)} cases")
    y_mal = np.isin(np.asarray(class_names)[y_true], list(malignant_classes))
    pred_ref, preds_new = probs_ref.argmax(1), runs_new.argmax(2)
    mal_ref = malignant_probability(probs_ref, class_names, malignant_classes)
    mals_new = [malignant_probability(run, class_names, malignant_classes) for run in runs_new]

    def deltas(idx: np.ndarray) -> tuple[float, float]:
        ref_bal = balanced_accuracy_score(y_true[idx], pred_ref[idx])
        ref_auc = roc_auc_score(y_mal[idx], mal_ref[idx])
        bal = np.mean([balanced_accuracy_score(y_true[idx], pred[idx]) for pred in preds_new]) - ref_bal
        auc = np.mean([roc_auc_score(y_mal[idx], mal[idx]) for mal in mals_new]) - ref_auc
        return float(bal), float(auc)

    rng = np.random.default_rng(seed)
    present = np.unique(y_true)
    samples = []
    while len(samples) < n_boot:
        idx = rng.integers(0, len(y_true), len(y_true))
        if len(np.unique(y_true[idx])) == len(present) and 0 < y_mal[idx].sum() < len(idx):
            samples.append(deltas(idx))
    samples = np.asarray(samples)
    point = deltas(np.arange(len(y_true)))
    return {
        name: {"delta": float(point[i]), "low": float(np.percentile(samples[:, i], 2.5)),
               "high": float(np.percentile(samples[:, i], 97.5))}
        for i, name in enumerate(("balanced_accuracy", "malignant_auc"))
    }


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str] = ("mel", "bcc", "akiec"),
    operating_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number the report shows, from labels and predicted class probabilities."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true) or probs.shape[1] != len(class_names):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y_true)}, {len(class_names)})")
    pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_auc": macro_ovr_auc(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
    present = [c for c in malignant_classes if c in class_names]
    if present:
        y_mal = np.isin(np.asarray(class_names)[y_true], present)
        p_mal = malignant_probability(probs, class_names, present)
        if 0 < y_mal.sum() < len(y_mal):
            metrics["malignant_auc"] = float(roc_auc_score(y_mal, p_mal))
            metrics["sensitivity_at_80_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.80)
            metrics["sensitivity_at_90_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.90)
            if operating_threshold is not None:
                referred = p_mal >= operating_threshold
                metrics["at_operating_threshold"] = {
                    "threshold": float(operating_threshold),
                    "sensitivity": float(referred[y_mal].mean()),
                    "specificity": float((~referred[~y_mal]).mean()),
                }
    return metrics


def save_plots(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str], out_dir: Path
) -> list[str]:
    """ROC curves, confusion matrix and reliability diagram as PNG files; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    y_true = np.asarray(y_true)

    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        if 0 < (y_true == c).sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
            ax.plot(fpr, tpr, lw=1, label=f"{name} (AUC {roc_auc_score(y_true == c, probs[:, c]):.2f})")
    present = [c for c in malignant_classes if c in class_names]
    y_mal = np.isin(np.asarray(class_names)[y_true], present)
    if present and 0 < y_mal.sum() < len(y_mal):
        p_mal = malignant_probability(probs, class_names, present)
        fpr, tpr, _ = roc_curve(y_mal, p_mal)
        ax.plot(fpr, tpr, "k", lw=2.5, label=f"malignant (AUC {roc_auc_score(y_mal, p_mal):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=120)
    plt.close(fig)
    written.append("roc.png")

    cm = confusion_matrix(y_true, probs.argmax(1), labels=list(range(len(class_names))))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised colour)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=120)
    plt.close(fig)
    written.append("confusion_matrix.png")

    bins = reliability_bins(y_true, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="k")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        title=f"Reliability (ECE {expected_calibration_error(y_true, probs):.3f})",
    )
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=120)
    plt.close(fig)
    written.append("reliability.png")
    return written


def save_reliability_comparison(
    y_true: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path, what: str = "test split"
) -> Path:
    """Reliability diagrams before and after calibration, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharey=True)
    for ax, probs, title in zip(axes, (before, after), ("before calibration", "after calibration")):
        bins = reliability_bins(y_true, probs)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7,
               edgecolor="k")
        ax.set(xlabel="confidence", title=f"{title} (ECE {expected_calibration_error(y_true, probs):.3f})",
               xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"Reliability on the {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    metrics: dict[str, Any], out_dir: str | Path, title: str = "Evaluation", extra: dict | None = None
) -> Path:
    """Write `report.json` and a readable `report.md` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": metrics, **(extra or {})}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=float))
    lines = [f"# {title}", ""]
    for key in HEADLINE_METRICS:
        if key in metrics:
            value = metrics[key]
            lines.append(
                f"- **{key.replace('_', ' ')}**: {value:.4f}" if isinstance(value, float) else f"- **{key}**: {value}"
            )
    if "at_operating_threshold" in metrics:
        op = metrics["at_operating_threshold"]
        lines.append(
            f"- **operating threshold** {op['threshold']:.4f} (chosen on validation): sensitivity "
            f"{op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
        )
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in metrics.get("per_class", {}).items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and key == "data":
            lines += ["", "## Data", "", "| class | real | synthetic |", "|---|---|---|"]
            for name, counts in value.get("train_counts", {}).items():
                lines.append(f"| {name} | {counts.get('real', 0)} | {counts.get('synthetic', 0)} |")
    calibration = (extra or {}).get("calibration")
    if calibration:
        lines += ["", "## Calibration", "",
                  f"{calibration['method']} scaling fitted on the {calibration['fitted_on']}"
                  + (f": temperature {calibration['temperature']:.3f}" if "temperature" in calibration else "")
                  + f"; validation ECE {calibration['ece_before']:.3f} → {calibration['ece_after']:.3f}, NLL "
                  f"{calibration['nll_before']:.3f} → {calibration['nll_after']:.3f}."]
        if "ece_uncalibrated" in metrics:
            lines.append(f"On this split: ECE {metrics['ece_uncalibrated']:.3f} before, {metrics['ece']:.3f} after.")
    for png in ("roc.png", "confusion_matrix.png", "reliability.png", "reliability_calibration.png"):
        if (out_dir / png).is_file():
            lines += ["", f"![{png[:-4]}]({png})"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"


def evaluate_bundle(
    bundle_dir: str | Path, data: str | Path, out_dir: str | Path, split: str | None = "test", tta: int | None = None
) -> dict:
    """Evaluate a saved bundle on a manifest (its `split` rows, or all rows) or a dataset folder; write the report.

    Probabilities are the bundle's calibrated ones, with its own test-time augmentation unless `tta` overrides it.
    """
    import pandas as pd

    from pipelines.manifest import ingest_class_folders, ingest_ham10000, read_manifest
    from pipelines.prediction import Predictor

    data = Path(data)
    if data.is_file():
        manifest = read_manifest(data)
        if split and (manifest.split == split).any():
            manifest = manifest[manifest.split == split]
    elif (data / "metadata.csv").is_file():
        manifest = ingest_ham10000(data)
    elif data.is_dir():
        manifest = ingest_class_folders(data)
    else:
        raise FileNotFoundError(f"evaluation data '{data}' is neither a manifest CSV nor a dataset folder")
    predictor = Predictor.from_path(bundle_dir, tta=tta)
    unknown = sorted(set(manifest.label) - set(predictor.class_names))
    if unknown:
        raise ValueError(
            f"data has labels {unknown} that bundle '{bundle_dir}' does not know ({predictor.class_names})"
        )
    table, errors = predictor.predict_files(manifest.path.tolist())
    kept = manifest.set_index(manifest.path.map(lambda p: Path(p).stem))["label"]
    y_true = np.array([predictor.class_names.index(kept[i]) for i in table.image_id])
    probs = table[[f"prob_{c}" for c in predictor.class_names]].to_numpy()
    metrics = compute_metrics(
        y_true, probs, predictor.class_names, predictor.bundle.malignant_classes, predictor.bundle.operating_threshold
    )
    out_dir = Path(out_dir)
    save_plots(y_true, probs, predictor.class_names, predictor.bundle.malignant_classes, out_dir)
    write_report(
        metrics, out_dir, f"Evaluation of {bundle_dir} on {data}",
        {"skipped_images": [str(e) for e in errors], "tta": predictor.tta,
         "calibration": predictor.bundle.card.get("calibration")},
    )
    pd.DataFrame(table).to_csv(out_dir / "predictions.csv", index=False)
    return metrics
