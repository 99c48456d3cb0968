"""`lesionlab mil-train | tile`: multiple-instance learning on H&E slides."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_config_arguments, add_model_arguments, load_run_config, settings_from_args
from pipelines.config import MILConfig, TilingSettings

__all__ = ["add_cli"]

# `tile` starts from the tiling a `mil:` config section uses.
TILE_DEFAULTS = MILConfig().tiling.model_dump(exclude_defaults=True)


def _cmd_mil_train(args: argparse.Namespace) -> None:
    from pipelines.run import run_stage

    config, run_dir = load_run_config(args)
    if config.mil is None:
        raise ValueError(f"config '{args.config}' has no `mil:` section")
    # As the `run` mil stage: records the config attempt and the marker, discards checkpoints of other settings.
    outputs = run_stage("mil", config, run_dir, None, force="lesionlab mil-train always trains").outputs
    print(f"bundle: {outputs.bundle}\nreport: {outputs.report}")


def _cmd_tile(args: argparse.Namespace) -> None:
    import pandas as pd

    from pipelines.bags import build_bag_manifest, ingest_slide_table, write_bag_manifest
    from pipelines.mil import list_slides

    settings = settings_from_args(TilingSettings, args, "tiling", TILE_DEFAULTS)
    if args.labels:
        slides = ingest_slide_table(args.root, args.labels, args.images, args.image_column, args.label_column,
                                    args.group_column)
    else:
        paths = list_slides(args.root)
        slides = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p.resolve()) for p in paths],
                               "label": "", "group": [p.stem for p in paths], "split": "", "source": "real"})
    bags = build_bag_manifest(slides, settings)
    write_bag_manifest(bags, args.out)
    per_slide = bags.groupby("slide_id").size()
    print(f"{len(bags)} patches from {len(per_slide)} slides ({per_slide.min()}-{per_slide.max()} each) -> {args.out}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `mil-train` and `tile`."""
    p = sub.add_parser("mil-train", help="train an SC-MIL / ABMIL bag classifier from a config with `mil:`")
    add_config_arguments(p, "mil.method=abmil training.epochs=5")
    p.set_defaults(func=_cmd_mil_train)

    p = sub.add_parser("tile", help="tile H&E images / slides into tissue patches; write a bag manifest CSV")
    p.add_argument("--root", required=True, help="dataset folder (with --labels) or a folder of slides")
    p.add_argument("--labels", help="labels CSV inside ROOT (e.g. labels.csv); omit to tile every slide in ROOT")
    p.add_argument("--images", default="images", help="image folder inside ROOT (with --labels)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", default=None)
    add_model_arguments(p, TilingSettings, defaults=TILE_DEFAULTS)
    p.add_argument("--out", required=True, help="bag manifest CSV to write")
    p.set_defaults(func=_cmd_tile)
