"""`lesionlab prune`: Beta-Rank (or L1 / HRank / random) structural pruning of a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import CliError, add_model_arguments, settings_from_args
from pipelines.config import PruningConfig

__all__ = ["add_cli"]


def _cmd_prune(args: argparse.Namespace) -> None:
    from pipelines.pruning import prune_bundle

    settings = settings_from_args(PruningConfig, args, "pruning")
    if not (Path(args.bundle) / "card.json").is_file():
        raise CliError(f"'{args.bundle}' is not a model bundle (no card.json)")
    if not Path(args.data).is_file():
        raise CliError(f"manifest '{args.data}' does not exist")
    report = prune_bundle(args.bundle, args.data, args.out, settings)
    b, a = report["before"], report["after"]
    print(f"pruned bundle: {args.out}  report: {Path(args.out) / 'pruning_report.md'}")
    print(f"FLOPs {b['flops'] / 1e6:.1f} M -> {a['flops'] / 1e6:.1f} M ({report['flops_reduction']:.1%} fewer), "
          f"params {b['params']:,} -> {a['params']:,}, p50 latency x{report['speedup_p50']:.2f} faster, "
          f"balanced accuracy {b['accuracy']['balanced_accuracy']:.3f} -> {a['accuracy']['balanced_accuracy']:.3f}, "
          f"malignant AUC {b['accuracy']['malignant_auc']:.3f} -> {a['accuracy']['malignant_auc']:.3f}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `prune`."""
    p = sub.add_parser("prune", help="Beta-Rank (or L1 / HRank / random) structural pruning of a bundle")
    p.add_argument("--bundle", required=True, help="trained image-classifier bundle")
    p.add_argument("--data", required=True, help="the manifest it was trained on (train: fine-tuning + calibration)")
    p.add_argument("--out", required=True, help="folder for the pruned bundle and pruning_report.md")
    add_model_arguments(p, PruningConfig, metavars={"layer_ratios": "CONV=FRACTION"},
                        flags={"global_pruning": "global", "layer_ratios": "layer_ratio",
                               "fine_tune_epochs": "epochs", "fine_tune_lr": "lr"})
    p.set_defaults(func=_cmd_prune)
