"""The evaluation report: ROC, confusion matrix and reliability plots, and report.md."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from pipelines.evaluation.metrics import (
    HEADLINE_METRICS,
    expected_calibration_error,
    malignant_probability,
    reliability_bins,
)

__all__ = ["interval_text", "save_plots", "save_reliability_comparison", "training_overlap_lines", "write_report"]

log = logging.getLogger(__name__)

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


def interval_text(interval: dict[str, float] | None, digits: int = 3) -> str:
    """' [low, high]' for a report line; '' when there is no interval."""
    if not interval:
        return ""
    return f" [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def training_overlap_lines(overlap: dict[str, Any] | None) -> list[str]:
    """The report's leakage line: a loud warning when scored images were training images, else what was checked."""
    if not overlap:
        return []
    what, manifest = overlap.get("what", "evaluated"), Path(overlap["training_manifest"]).name
    if overlap["training_images"]:
        return [f"> **Warning: {overlap['training_images']} of the {overlap['checked']} {what} images were used to "
                f"train this bundle** (the `train` rows of its training manifest `{manifest}`). The numbers below "
                "overstate how well it does on new images; score it on its held-out test split instead.", ""]
    return [f"None of the {overlap['checked']} {what} images is a training image of this bundle (checked against "
            f"its training manifest `{manifest}`).", ""]


def write_report(
    metrics: dict[str, Any], out_dir: str | Path, title: str = "Evaluation", extra: dict | None = None
) -> Path:
    """Write `report.json` and a readable `report.md` into `out_dir`.

    `metrics["intervals"]` (from `bootstrap_intervals`) puts a 95 % interval next to balanced accuracy, malignant
    AUC, the sensitivity at the threshold and each class's recall; `extra["training_overlap"]` (from
    `check_training_overlap`) puts the leakage warning at the top.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": metrics, **(extra or {})}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=float))
    intervals = metrics.get("intervals") or {}
    lines = [f"# {title}", "", *training_overlap_lines((extra or {}).get("training_overlap"))]
    for key in HEADLINE_METRICS:
        if key in metrics:
            value = metrics[key]
            lines.append(
                f"- **{key.replace('_', ' ')}**: {value:.4f}{interval_text(intervals.get(key))}"
                if isinstance(value, float) else f"- **{key}**: {value}"
            )
    if "at_operating_threshold" in metrics:
        op = metrics["at_operating_threshold"]
        lines.append(
            f"- **operating threshold** {op['threshold']:.4f} (chosen on validation): sensitivity "
            f"{op['sensitivity']:.3f}{interval_text(intervals.get('sensitivity_at_threshold'))}, specificity "
            f"{op['specificity']:.3f}{interval_text(intervals.get('specificity_at_threshold'))}"
        )
    recall_ci = intervals.get("recall") or {}
    head = "| class | precision | recall | F1 | support |" + (" recall 95 % interval |" if recall_ci else "")
    lines += ["", head, "|---|---|---|---|---|" + ("---|" if recall_ci else "")]
    for name, row in metrics.get("per_class", {}).items():
        line = f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
        if recall_ci:
            line += f"{interval_text(recall_ci.get(name)) or ' n/a'} |"
        lines.append(line)
    if intervals:
        lines += ["", f"[low, high]: {100 * intervals['confidence']:.0f} % {intervals['method']} "
                  f"({intervals['n_boot']} resamples, seed {intervals['seed']}); a class with few images has a "
                  "narrow interval that means little."]
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and key == "data":
            lines += ["", "## Data", "", "| class | real | synthetic |", "|---|---|---|"]
            for name, counts in value.get("train_counts", {}).items():
                lines.append(f"| {name} | {counts.get('real', 0)} | {counts.get('synthetic', 0)} |")
    calibration = (extra or {}).get("calibration")
    if calibration and "ece_before" in calibration:
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
