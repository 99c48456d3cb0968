"""What a balancing run reports: the original and re-trained heads compared on the embeddings, and the
`report.json` / `report.md` pair."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipelines.balancing.head import head_probs

__all__ = ["compare_heads", "write_balancing_report"]

HEAD_METRICS = ("balanced_accuracy", "macro_auc", "malignant_auc", "accuracy")


def compare_heads(
    before: nn.Linear,
    after: nn.Linear,
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    class_names: Sequence[str],
    malignant: Sequence[str],
    n_boot: int,
) -> dict[str, Any]:
    """Per held-out split (val, test): both heads' card metrics on the embeddings (one view, uncalibrated), with
    bootstrap intervals, and the paired bootstrap change when the split has malignant and benign images."""
    from pipelines.evaluation import bootstrap_intervals, card_metrics, compute_metrics, paired_bootstrap_delta

    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        y = labels[split]
        if not len(y):
            continue
        pair = {"before": head_probs(before, features[split]), "after": head_probs(after, features[split])}
        metrics[split] = {}
        for side, probs in pair.items():
            scored = compute_metrics(y, probs, class_names, malignant)
            intervals = bootstrap_intervals(y, probs, class_names, malignant, n_boot=n_boot)
            metrics[split][side] = card_metrics({**scored, "intervals": intervals} if intervals else scored)
        y_malignant = np.isin(np.asarray(class_names)[y], malignant)
        if n_boot and 0 < y_malignant.sum() < len(y_malignant):
            metrics[split]["change"] = paired_bootstrap_delta(y, pair["before"], pair["after"], class_names,
                                                              malignant, n_boot)
    return metrics


def _head_lines(split: str, pair: dict[str, Any]) -> list[str]:
    """The before/after table of one split, with 95 % intervals and the paired change."""
    from pipelines.evaluation import interval_text

    ci = {side: pair[side].get("intervals") or {} for side in ("before", "after")}
    change = pair.get("change") or {}
    lines = ["", f"## {split} (heads on the embeddings, one view, uncalibrated)", "",
             "| metric | before | after | change [95 % paired interval] |", "|---|---|---|---|"]
    for key in HEAD_METRICS:
        if key in pair["after"]:
            d = change.get(key)
            delta = f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
            lines.append(f"| {key} | {pair['before'].get(key, float('nan')):.4f}"
                         f"{interval_text(ci['before'].get(key))} | {pair['after'][key]:.4f}"
                         f"{interval_text(ci['after'].get(key))} | {delta} |")
    for name, recall in pair["after"]["recall"].items():
        lines.append(f"| recall {name} | {pair['before']['recall'][name]:.3f}"
                     f"{interval_text(ci['before'].get('recall', {}).get(name))} | {recall:.3f}"
                     f"{interval_text(ci['after'].get('recall', {}).get(name))} | |")
    return lines


def _shipped_lines(shipped: dict[str, Any]) -> list[str]:
    """The balanced bundle's own card metrics (test split, else validation)."""
    from pipelines.evaluation import interval_text

    block = shipped.get("test") or shipped.get("validation")
    if not block:
        return []
    split = "test" if shipped.get("test") else "validation"
    ci = block.get("intervals") or {}
    lines = ["", f"## The balanced bundle as shipped ({split} split, calibrated, {block['n']} images)", "",
             f"- balanced accuracy {block['balanced_accuracy']:.4f}{interval_text(ci.get('balanced_accuracy'))}"]
    if "malignant_auc" in block:
        lines.append(f"- malignant AUC {block['malignant_auc']:.4f}{interval_text(ci.get('malignant_auc'))}")
    if "at_operating_threshold" in block:
        op = block["at_operating_threshold"]
        lines.append(f"- at the threshold: sensitivity {op['sensitivity']:.3f}"
                     f"{interval_text(ci.get('sensitivity_at_threshold'))}, specificity "
                     f"{op['specificity']:.3f}{interval_text(ci.get('specificity_at_threshold'))}")
    if ci:
        lines.append(f"- [low, high]: {100 * ci['confidence']:.0f} % {ci['method']} ({ci['n_boot']} resamples, "
                     f"seed {ci['seed']})")
    return lines


def write_balancing_report(report: dict[str, Any], out_dir: Path) -> Path:
    """`report.json` and a before/after `report.md` for one balancing run (95 % bootstrap intervals in brackets)."""
    from pipelines.evaluation import training_overlap_lines

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    bal = report["balancing"]
    lines = [f"# Feature-space balancing: {bal['method']}", "", *training_overlap_lines(report.get("training_overlap")),
             f"Head re-trained ({bal['head_init']}, loss {bal['head_loss']}, weighting {bal['class_weighting']}, "
             f"sampler {bal['sampler']}, best epoch {bal['best_epoch']}/{bal['head_epochs']}); "
             f"prior correction: {'yes' if bal['prior_correction'] else 'no'}.", "",
             "| class | train before | train after |", "|---|---|---|"]
    for name, n in bal["train_counts_before"].items():
        lines.append(f"| {name} | {n} | {bal['train_counts_after'][name]} |")
    for split, pair in report["metrics"].items():
        lines += _head_lines(split, pair)
    lines += _shipped_lines(report.get("bundle_metrics") or {})
    if report.get("threshold"):
        t = report["threshold"]
        lines += ["", f"Operating threshold {t['threshold']:.4f} on P(malignant), chosen on validation for "
                  f"sensitivity >= {t['target_sensitivity']}: sensitivity {t['sensitivity']:.3f}, "
                  f"specificity {t['specificity']:.3f}."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"
