"""`lesionlab balance`: feature-space SMOTE and head re-training on a bundle, or pixel-space SMOTE on a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import CliError, add_model_arguments, settings_from_args
from pipelines.config import BalancingConfig

__all__ = ["add_cli"]


def _cmd_balance(args: argparse.Namespace) -> None:
    from pipelines.balancing import balance_bundle, pixel_smote
    from pipelines.manifest import read_manifest, write_manifest

    settings = settings_from_args(BalancingConfig, args, "balancing")
    out = Path(args.out)
    if settings.space == "pixel":
        manifest, report = pixel_smote(read_manifest(args.manifest), out, settings)
        path = write_manifest(manifest, Path(args.out_manifest or out / "manifest.csv"))
        print(f"{report['synthetic_images']} synthetic images; manifest -> {path}; contact sheet -> "
              f"{report['contact_sheet']}")
        return
    if not args.bundle:
        raise CliError("--bundle is required for feature-space balancing (it re-trains that bundle's head)")
    report = balance_bundle(args.bundle, args.manifest, out, settings, report_dir=args.report_dir)
    val = report["metrics"]["val"]
    print(f"bundle: {report['bundle']}\nreport: {report['report']}\nvalidation balanced accuracy "
          f"{val['before']['balanced_accuracy']:.4f} -> {val['after']['balanced_accuracy']:.4f}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `balance`."""
    p = sub.add_parser(
        "balance", help="feature-space SMOTE + head re-training on a bundle, or pixel-space SMOTE on a manifest")
    p.add_argument("--bundle", help="trained image bundle (feature space)")
    p.add_argument("--manifest", required=True, help="the manifest the bundle was trained on")
    p.add_argument("--out", required=True, help="balanced bundle folder (feature) or output folder (pixel)")
    p.add_argument("--out-manifest", help="pixel space: manifest to write (default OUT/manifest.csv)")
    p.add_argument("--report-dir", help="feature space: report folder (default OUT/balancing_report)")
    add_model_arguments(p, BalancingConfig, flags={"target_ratio": "ratio"})
    p.set_defaults(func=_cmd_balance)
