"""The before / after accuracy of a pruned net and `pruning_report.json` / `pruning_report.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["accuracy_report", "minority_classes_of", "write_pruning_report"]


def accuracy_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], malignant_classes: list[str],
    minority_classes: list[str], operating_threshold: float | None = None, n_boot: int = 0, seed: int = 0,
) -> dict[str, Any]:
    """Balanced accuracy, malignant AUC, macro AUC and per-class / minority recalls; with `n_boot` > 0 also their
    95 % bootstrap intervals (`intervals`, from `pipelines.evaluation.bootstrap_intervals`)."""
    from pipelines.evaluation import bootstrap_intervals, compute_metrics

    metrics = compute_metrics(y_true, probs, class_names, malignant_classes, operating_threshold)
    recalls = {name: metrics["per_class"][name]["recall"] for name in class_names}
    report = {
        "balanced_accuracy": metrics["balanced_accuracy"],
        "malignant_auc": metrics.get("malignant_auc", float("nan")),
        "macro_auc": metrics["macro_auc"],
        "recall": recalls,
        "minority_recall": float(np.mean([recalls[c] for c in minority_classes])) if minority_classes else float("nan"),
        "n": metrics["n"],
    }
    if "at_operating_threshold" in metrics:
        report["at_operating_threshold"] = metrics["at_operating_threshold"]
    intervals = bootstrap_intervals(y_true, probs, class_names, malignant_classes, operating_threshold, n_boot, seed)
    if intervals is not None:
        report["intervals"] = intervals
    return report


def minority_classes_of(counts: list[int], class_names: list[str]) -> list[str]:
    """The rarer half of the classes (by training count): the ones pruning tends to forget first."""
    order = np.argsort(counts, kind="stable")
    return [class_names[i] for i in order[: max(1, len(class_names) // 2)]]


def _intervals(side: dict[str, Any]) -> dict[str, Any]:
    return side["accuracy"].get("intervals") or {}


def _table_rows(before: dict[str, Any], after: dict[str, Any], minority: list[str]) -> list[tuple[str, str, str]]:
    """(what, before, after) rows of the report's table."""
    from pipelines.evaluation import interval_text

    def with_interval(side: dict[str, Any], key: str) -> str:
        return f"{side['accuracy'][key]:.3f}{interval_text(_intervals(side).get(key))}"

    b, a = before, after
    rows = [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}"),
        ("FLOPs (batch 1)", f"{b['flops'] / 1e6:.1f} M", f"{a['flops'] / 1e6:.1f} M"),
        ("weights file", f"{b['file_bytes'] / 1024:.0f} KB", f"{a['file_bytes'] / 1024:.0f} KB"),
        ("CPU latency p50 (batch 1)", f"{b['latency_ms_p50']:.1f} ms", f"{a['latency_ms_p50']:.1f} ms"),
        ("CPU throughput (batch 32)", f"{b['throughput_images_per_s']:.0f} img/s",
         f"{a['throughput_images_per_s']:.0f} img/s"),
        ("balanced accuracy", with_interval(b, "balanced_accuracy"), with_interval(a, "balanced_accuracy")),
        ("malignant AUC", with_interval(b, "malignant_auc"), with_interval(a, "malignant_auc")),
        ("minority recall (" + ", ".join(minority) + ")",
         f"{b['accuracy']['minority_recall']:.3f}", f"{a['accuracy']['minority_recall']:.3f}"),
    ]
    rows += [(f"recall {c}", *(f"{x['accuracy']['recall'][c]:.3f}"
                               f"{interval_text(_intervals(x).get('recall', {}).get(c))}" for x in (b, a)))
             for c in b["accuracy"]["recall"]]
    return rows


def write_pruning_report(report: dict[str, Any], out_dir: Path) -> Path:
    """`pruning_report.json` and a short `pruning_report.md` table (before / after); returns the markdown path."""
    from pipelines.evaluation import training_overlap_lines

    out_dir = Path(out_dir)
    (out_dir / "pruning_report.json").write_text(json.dumps(report, indent=2, default=float))
    b, a = report["before"], report["after"]
    rows = _table_rows(b, a, report["minority_classes"])
    lines = [f"# Pruning report ({report['settings']['method']}, {report['flops_reduction']:.1%} fewer FLOPs)", "",
             *training_overlap_lines(report.get("training_overlap")),
             f"Evaluated on the `{report['eval_split']}` split ({b['accuracy']['n']} images), each bundle with its "
             "own calibration and test-time augmentation.", "",
             "| | before | after |", "|---|---|---|", *[f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]]
    intervals = _intervals(a) or _intervals(b)
    if intervals:
        lines += ["", f"[low, high]: {100 * intervals['confidence']:.0f} % {intervals['method']} "
                  f"({intervals['n_boot']} resamples, seed {intervals['seed']})."]
    if report.get("delta"):
        d = report["delta"]
        lines += ["", "Change after - before, 95 % paired bootstrap on the same images: balanced accuracy "
                  f"{d['balanced_accuracy']['delta']:+.3f} [{d['balanced_accuracy']['low']:+.3f}, "
                  f"{d['balanced_accuracy']['high']:+.3f}], malignant AUC {d['malignant_auc']['delta']:+.3f} "
                  f"[{d['malignant_auc']['low']:+.3f}, {d['malignant_auc']['high']:+.3f}]."]
    path = out_dir / "pruning_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
