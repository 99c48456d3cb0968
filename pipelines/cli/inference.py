"""`lesionlab predict | export`: a bundle on new images, and its ONNX export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli.common import CliError, default_bundle_path
from pipelines.cli.runs import add_engine_argument, add_tta_argument

__all__ = ["add_cli"]


def _cmd_predict(args: argparse.Namespace) -> None:
    from models.bundle import load_bundle, read_card
    from pipelines.prediction import write_predictions

    if read_card(args.bundle).get("task") != "mil":
        _predict_images(args)
        return
    from pipelines.mil import predict_slides

    errors: list = []
    table = predict_slides(load_bundle(args.bundle), args.images, errors)
    if not len(table):
        if errors:
            raise CliError(f"all {len(errors)} slides in '{args.images}' were skipped (first: {errors[0]}); "
                           f"no predictions written to '{args.out}'")
        raise CliError(f"'{args.images}' lists no slides to predict; no predictions written to '{args.out}'")
    write_predictions(table, errors, args.out, "slides")


def _predict_images(args: argparse.Namespace) -> None:
    """Image bundles: streamed into the CSV batch by batch (resumable, shardable; pipelines.batch_predict)."""
    from pipelines.batch_predict import parse_shard, predict_stream, shard_output
    from pipelines.prediction import Predictor, list_images

    index, count = parse_shard(args.shard)
    paths = list_images(args.images)[index::count]
    out = shard_output(args.out, index, count)
    predictor = Predictor.from_path(args.bundle, tta=args.tta, engine=args.engine)
    result = predict_stream(predictor, paths, out, batch_size=args.batch_size, workers=args.workers,
                            resume=args.resume, progress=not args.no_progress)
    for err in result.errors:
        print(f"skipped: {err}", file=sys.stderr)
    if not result.written and not result.resumed:
        out.unlink(missing_ok=True)
        if result.errors:
            raise CliError(f"all {len(result.errors)} files in '{args.images}' were skipped (first: "
                           f"{result.errors[0]}); no predictions written to '{out}'")
        raise CliError(f"'{args.images}' lists no files to predict; no predictions written to '{out}'")
    shard = f" (shard {index}/{count})" if count > 1 else ""
    print(f"{result.written} predictions written to {out}{shard}; {result.resumed} already there; "
          f"{len(result.errors)} files skipped; engine: {predictor.engine}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import export_bundle

    block = export_bundle(args.bundle, args.data, int8=args.int8, calibration_images=args.calibration_images,
                          keep_float=args.int8_keep_float)
    for folder, member in (block["members"].items() if "members" in block else [(".", block)]):
        parts = [f"fp32 max |Δp| {member['fp32']['parity']['max_abs_prob_diff']:.1e}"]
        if "int8" in member:
            parity = member["int8"]["parity"]
            parity = parity.get("served", parity)
            parts.append(f"int8 top-1 agreement {parity['top1_agreement']:.3f}, "
                         f"validated: {member['int8']['validated']}")
        print(f"{Path(args.bundle) / folder}: " + "; ".join(parts))



def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `predict` and `export`."""
    p = sub.add_parser("predict", help="predict a folder or CSV of images; one CSV row per image")
    p.add_argument("--bundle", default=str(default_bundle_path()))
    p.add_argument("--images", required=True, help="folder of images or CSV with a 'path' column")
    p.add_argument("--out", required=True, help="CSV to write")
    add_tta_argument(p)
    add_engine_argument(p)
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and predict only the "
                   "other images (an interrupted run goes on where it stopped)")
    p.add_argument("--shard", metavar="K/N", help="predict every N-th file from the K-th into OUT.rank<K>-of-<N>.csv "
                   "(default: RANK/WORLD_SIZE when started by torchrun or accelerate launch, else everything)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a bundle to ONNX (and int8) for faster CPU inference")
    p.add_argument("--bundle", required=True, help="image bundle (an ensemble exports each member)")
    p.add_argument("--data", help="the bundle's own manifest: parity on its validation images, int8 calibration on "
                   "its training images (required with --int8)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ quantization)")
    p.add_argument("--calibration-images", type=int, default=256, help="training images for the int8 calibration")
    p.add_argument("--int8-keep-float", type=int, default=0, metavar="K",
                   help="leave the first K convolutions (the full-resolution ones) in float in the int8 file")
    p.set_defaults(func=_cmd_export)

