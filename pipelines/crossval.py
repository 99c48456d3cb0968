"""Grouped k-fold cross-validation of image training: the headline metrics of every fold, their mean and spread.

One test split of a few hundred images gives one number with a wide interval; k folds, each training the configured
classifier on the other groups, show how much that number moves with the split.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import RunConfig

log = logging.getLogger(__name__)

METRICS = ("balanced_accuracy", "malignant_auc")


def cv_folds(manifest: pd.DataFrame, folds: int, val_fraction: float, seed: int = 0) -> list[pd.DataFrame]:
    """`folds` manifests of the real rows: in fold i one fold of groups is the test split and the other groups are
    split into train and val by group; folds are stratified by each group's label (StratifiedGroupKFold).

    Synthetic rows are left out: they were generated from one fixed training split and would leak into other folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    from pipelines.manifest import grouped_split

    real = manifest[manifest.source == "real"].reset_index(drop=True)
    n_groups = real.group.nunique()
    if folds < 2 or folds > n_groups:
        raise ValueError(f"cross-validation needs between 2 and {n_groups} folds (the number of groups); got {folds}")
    group_label = real.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    labels = real.group.map(group_label).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for rest, held in splitter.split(real, labels, real.group.to_numpy()):
        inner = grouped_split(real.iloc[rest], val_fraction, 0.0, seed)
        test = real.iloc[held].assign(split="test")
        out.append(pd.concat([inner, test]).sort_index())
    return out


def _mean_sd(values: list[float | None]) -> dict[str, float | int | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "sd": sd, "n": len(finite)}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def run_cv(config: RunConfig, run_dir: str | Path, folds: int = 5, manifest: str | Path | None = None) -> dict:
    """Train the configured image classifier on each fold into `run_dir/fold_<i>/` and write `run_dir/cv.json` and
    `run_dir/cv.md` (per-fold test balanced accuracy and malignant AUC, their mean and sample standard deviation).

    Each fold is the `train` stage of `lesionlab run` in its own run directory, so a killed cross-validation resumes
    and a finished fold with the same config and fold manifest is reused.
    """
    from models.bundle import read_card
    from pipelines.manifest import read_manifest, write_manifest
    from pipelines.provenance import code_version, record_attempt, run_relative
    from pipelines.run import launched_processes, read_dataset, run_stage

    if launched_processes() is not None:
        raise ValueError("lesionlab cv runs folds one after another in one process; start it without accelerate launch")
    if config.mil is not None:
        raise ValueError("lesionlab cv cross-validates image training; this config has a mil section")
    run_dir = Path(run_dir)
    data = read_manifest(manifest) if manifest is not None else read_dataset(config.data)
    attempt = record_attempt(config, run_dir)
    rows: list[dict[str, Any]] = []
    for i, fold in enumerate(cv_folds(data, folds, config.split.val_fraction, config.split.seed)):
        fold_dir = run_dir / f"fold_{i}"
        log.info("cross-validation fold %d/%d: %s", i + 1, folds, fold.split.value_counts().to_dict())
        path = write_manifest(fold, fold_dir / "manifest.csv")
        result = run_stage("train", config, fold_dir, path)
        card = read_card(result.outputs.bundle)
        test = card.get("metrics", {}).get("test", {})
        counts = fold.split.value_counts()
        rows.append({
            "fold": i,
            **{split: int(counts.get(split, 0)) for split in ("train", "val", "test")},
            **{metric: test.get(metric) for metric in METRICS},
            "bundle": run_relative(result.outputs.bundle, run_dir),
        })
    summary = {
        "folds": folds,
        "grouping": "group column, stratified by each group's majority label (StratifiedGroupKFold)",
        "seed": config.split.seed,
        "images": int((data.source == "real").sum()),
        "config": f"configs/attempt-{attempt}.yaml",
        "code_version": code_version(),
        "per_fold": rows,
        "summary": {metric: _mean_sd([row[metric] for row in rows]) for metric in METRICS},
    }
    (run_dir / "cv.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# {folds}-fold grouped cross-validation: {config.model.name}",
        "",
        f"{summary['images']} real images; each fold's test split is one fold of groups (lesions or patients); the "
        "other groups are split into train and val by group. Metrics are on each fold's test split.",
        "",
        "| fold | train | val | test | balanced accuracy | malignant AUC |",
        "|---|---|---|---|---|---|",
        *[f"| {r['fold']} | {r['train']} | {r['val']} | {r['test']} | {_fmt(r['balanced_accuracy'])} | "
          f"{_fmt(r['malignant_auc'])} |" for r in rows],
    ]
    stats = summary["summary"]
    lines += [
        f"| mean | | | | {_fmt(stats['balanced_accuracy']['mean'])} | {_fmt(stats['malignant_auc']['mean'])} |",
        f"| sd | | | | {_fmt(stats['balanced_accuracy']['sd'])} | {_fmt(stats['malignant_auc']['sd'])} |",
        "",
        "sd is the sample standard deviation over folds (ddof = 1).",
    ]
    (run_dir / "cv.md").write_text("\n".join(lines) + "\n")
    log.info("cross-validation written to %s", run_dir / "cv.md")
    return summary
