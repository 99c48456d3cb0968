"""`lesionlab ingest`: a dataset layout -> a manifest CSV, split by group."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_model_arguments, settings_from_args
from pipelines.config import DataConfig, SplitConfig

__all__ = ["add_cli"]


def _cmd_ingest(args: argparse.Namespace) -> None:
    from pipelines.manifest import grouped_split, write_manifest
    from pipelines.run import read_dataset

    split = settings_from_args(SplitConfig, args, "split")
    data = settings_from_args(DataConfig, args, "data", {"format": args.format, "root": args.root,
                                                         "metadata": args.metadata, "images": args.images})
    df = read_dataset(data, check_malignant=args.malignant_classes is not None)
    if not args.no_split:
        df = grouped_split(df, split.val_fraction, split.test_fraction, split.seed)
    write_manifest(df, args.out)
    print(f"manifest with {len(df)} images written to {args.out}")
    if not args.no_split:
        print(df.groupby(["label", "split"]).size().unstack(fill_value=0).to_string())


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `lesionlab ingest`."""
    p = sub.add_parser("ingest", help="read a dataset layout into a manifest CSV and split it by group")
    p.add_argument("--format", choices=["ham10000", "folders"], default="ham10000")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--metadata", help="metadata CSV (default: ROOT/metadata.csv)")
    p.add_argument("--images", action="append", help="image folder(s) (default: ROOT/images)")
    add_model_arguments(p, DataConfig, skip=("format", "root", "metadata", "images", "manifest"),
                        metavars={"classes": "CLASS", "malignant_classes": "CLASS"})
    p.add_argument("--out", required=True, help="manifest CSV to write")
    add_model_arguments(p, SplitConfig)
    p.add_argument("--no-split", action="store_true", help="leave split empty")
    p.set_defaults(func=_cmd_ingest)
