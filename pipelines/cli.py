"""The `lesionlab` command line: one sub-command per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

import pipelines  # noqa: F401 - sets the offline/private environment defaults

log = logging.getLogger("lesionlab")

# Modules that register more sub-commands through `add_cli(subparsers)`.
COMMAND_MODULES: list[str] = [
    "pipelines.captions", "pipelines.synthesis", "pipelines.balancing", "pipelines.pruning", "pipelines.mil",
    "pipelines.synth_report",
]


class CliError(Exception):
    """A user error the CLI reports as one line (exit code 2)."""


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """What every config-driven command takes: --config, --run-dir and `section.field=value` overrides."""
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir")
    parser.add_argument("overrides", nargs="*", help=f"section.field=value, e.g. {example}")


def load_run_config(args: argparse.Namespace):
    """The validated config (with overrides) of a command from `add_config_arguments`, and its run directory."""
    from pipelines.config import load_config

    config = load_config(args.config, args.overrides)
    return config, Path(args.run_dir or config.run_dir)


def _cmd_ingest(args: argparse.Namespace) -> None:
    from pipelines.manifest import grouped_split, ingest_class_folders, ingest_ham10000, write_manifest

    if args.format == "ham10000":
        df = ingest_ham10000(args.root, args.metadata, args.images, args.malignant_classes, args.classes)
    else:
        df = ingest_class_folders(args.root, args.groups, args.classes, args.malignant_classes)
    if not args.no_split:
        df = grouped_split(df, args.val_fraction, args.test_fraction, args.seed)
    write_manifest(df, args.out)
    print(f"manifest with {len(df)} images written to {args.out}")
    if not args.no_split:
        print(df.groupby(["label", "split"]).size().unstack(fill_value=0).to_string())


def _cmd_run(args: argparse.Namespace) -> None:
    from pipelines.run import run_pipeline

    config, run_dir = load_run_config(args)
    outputs = run_pipeline(config, run_dir, rerun=not args.no_rerun)
    print(f"run directory: {run_dir}")
    for stage, result in outputs.items():
        for key in ("bundle", "report", "manifest"):
            if key in result:
                print(f"  {stage}: {key} -> {result[key]}")


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.run import run_pipeline, run_stage, stage_ingest

    config, run_dir = load_run_config(args)
    if config.mil is not None:
        run_pipeline(config.model_copy(update={"pruning": None, "balancing": None}), run_dir)
        print(f"MIL run written to {run_dir}")
        return
    if args.manifest:
        manifest = Path(args.manifest)
    else:
        manifest = Path(stage_ingest(config, run_dir, None)["manifest"])
    # As the `run` train stage: writes config.yaml and stages/train.json, discards checkpoints of other settings.
    bundle = run_stage("train", config, run_dir, manifest, force="lesionlab train always trains").outputs["bundle"]
    print(f"bundle: {bundle}\nreport: {run_dir / 'report' / 'report.md'}")


def _cmd_cv(args: argparse.Namespace) -> None:
    from pipelines.crossval import run_cv

    config, run_dir = load_run_config(args)
    summary = run_cv(config, run_dir, args.folds, args.manifest)
    stats = {k: {s: (round(v, 4) if v is not None else None) for s, v in m.items() if s != "n"}
             for k, m in summary["summary"].items()}
    print(f"cross-validation: {run_dir / 'cv.md'}\n{stats}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluation import evaluate_bundle

    out = Path(args.out or Path(args.bundle) / "evaluation")
    metrics = evaluate_bundle(args.bundle, args.data, out, split=args.split, tta=args.tta, n_boot=args.bootstrap,
                              engine=args.engine)
    summary = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"report: {out / 'report.md'}\n{summary}")


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

    block = export_bundle(args.bundle, args.data, int8=args.int8, calibration_images=args.calibration_images)
    for folder, member in (block["members"].items() if "members" in block else [(".", block)]):
        parts = [f"fp32 max |Δp| {member['fp32']['parity']['max_abs_prob_diff']:.1e}"]
        if "int8" in member:
            parity = member["int8"]["parity"]
            parts.append(f"int8 top-1 agreement {parity['top1_agreement']:.3f}, "
                         f"validated: {member['int8']['validated']}")
        print(f"{Path(args.bundle) / folder}: " + "; ".join(parts))


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from pipelines.ensemble import build_ensemble

    card = build_ensemble(args.members, args.data, args.out, args.target_sensitivity)
    summary = {split: {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
               for split, metrics in card["metrics"].items()}
    print(f"ensemble bundle: {args.out}\n{summary}")


def _cmd_serve(args: argparse.Namespace) -> None:
    # The CLI lives in pipelines/, the UI in app/; `serve` is the one place that reaches up, by name.
    importlib.import_module("app.server").serve_cli(args)


def _cmd_users(args: argparse.Namespace) -> None:
    importlib.import_module("app.auth").users_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="lesionlab", description="Imbalance-aware medical image classification.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="read a dataset layout into a manifest CSV and split it by group")
    p.add_argument("--format", choices=["ham10000", "folders"], default="ham10000")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--metadata", help="metadata CSV (default: ROOT/metadata.csv)")
    p.add_argument("--images", action="append", help="image folder(s) (default: ROOT/images)")
    p.add_argument("--groups", help="folders format: CSV with image_id,group (default: ROOT/groups.csv if present)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="the expected classes; any other label is an error")
    p.add_argument("--malignant-classes", nargs="+", metavar="CLASS",
                   help="classes counted as malignant, each checked to be a class (default for ham10000: mel bcc "
                   "akiec, unchecked)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-split", action="store_true", help="leave split empty")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("run", help="run every stage the config enables, resuming a finished or killed run")
    add_config_arguments(p, "training.epochs=3 pruning.method=l1")
    p.add_argument("--no-rerun", action="store_true", help="refuse, instead of re-running, a finished stage whose "
                   "config section or inputs changed")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="train a classifier from a config (ingest + split + train)")
    add_config_arguments(p, "training.epochs=3")
    p.add_argument("--manifest", help="use this manifest instead of ingesting the config's data")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("cv", help="grouped k-fold cross-validation of image training (mean and spread over folds)")
    add_config_arguments(p, "training.epochs=3")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--manifest", help="use this manifest instead of ingesting the config's data")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("evaluate", help="evaluate a bundle on a manifest (its test split) or a dataset folder")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="manifest CSV or dataset folder")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default test; all rows if absent)")
    p.add_argument("--out", help="report folder (default BUNDLE/evaluation)")
    p.add_argument("--tta", type=int, choices=[1, 8], help="test-time-augmentation views (default: the bundle's "
                   "own setting, which its calibration and threshold were fitted with)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals (0: none)")
    p.add_argument("--engine", choices=["auto", "eager", "onnx", "int8"], default="auto",
                   help="network runtime: auto uses the bundle's exported ONNX file when it has one (see `lesionlab "
                   "export`), else eager PyTorch")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="predict a folder or CSV of images; one CSV row per image")
    p.add_argument("--bundle", default=str(default_bundle_path()))
    p.add_argument("--images", required=True, help="folder of images or CSV with a 'path' column")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--tta", type=int, choices=[1, 8], help="test-time-augmentation views (default: the bundle's "
                   "own setting, which its calibration and threshold were fitted with)")
    p.add_argument("--engine", choices=["auto", "eager", "onnx", "int8"], default="auto",
                   help="network runtime: auto uses the bundle's exported ONNX file when it has one (see `lesionlab "
                   "export`), else eager PyTorch")
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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("ensemble", help="combine trained bundles into one ensemble bundle (mean of calibrated "
                       "probabilities) with a threshold chosen on validation")
    p.add_argument("--members", nargs="+", required=True, help="two or more image bundles trained on --data")
    p.add_argument("--data", required=True, help="the manifest the members were trained on (its val/test rows)")
    p.add_argument("--out", required=True, help="ensemble bundle folder to write")
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("serve", help="launch the Gradio web app")
    p.add_argument("--models", default=str(default_bundle_path().parent), help="folder of model bundles")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=2, help="requests processed at once")
    p.add_argument("--max-file-mb", type=float, default=25.0)
    p.add_argument("--max-megapixels", type=float, default=50.0)
    p.add_argument("--tta", type=int, choices=[1, 8], help="test-time-augmentation views (default: the bundle's "
                   "own setting, which its calibration and threshold were fitted with)")
    p.add_argument("--engine", choices=["auto", "eager", "onnx", "int8"], default="auto",
                   help="network runtime: auto uses the bundle's exported ONNX file when it has one (see `lesionlab "
                   "export`), else eager PyTorch")
    p.add_argument("--auth-file", default=os.environ.get("LESIONLAB_AUTH_FILE"),
                   help="login file (lines 'username:<scrypt hash>', see `lesionlab users add`; default "
                   "$LESIONLAB_AUTH_FILE): every page, upload and API call then needs a login")
    p.add_argument("--audit-log", default=os.environ.get("LESIONLAB_AUDIT_LOG"),
                   help="append one JSON line per analysis (time, user, model, referral, latency; never file names "
                   "or images) to this file (default $LESIONLAB_AUDIT_LOG; none when unset)")
    p.add_argument("--metrics-token-file", default=os.environ.get("LESIONLAB_METRICS_TOKEN_FILE"),
                   help="file holding a bearer token that GET /metrics then requires (default "
                   "$LESIONLAB_METRICS_TOKEN_FILE); with --auth-file and no token, /metrics is refused")
    p.add_argument("--header-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection whose request headers are not complete this long after it opened or "
                   "after its last response (default 15; 0 turns it off)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("users", help="manage the web app's login file")
    users = p.add_subparsers(dest="users_command", required=True)
    p = users.add_parser("add", help="add a user (or set a new password) in a login file")
    p.add_argument("--auth-file", required=True, help="login file to create or update (mode 0600)")
    p.add_argument("name", help="username: letters, digits, . _ @ -")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=_cmd_users)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def default_bundle_path() -> Path:
    """The bundle shipped with lesionlab (models/default_bundle in the source tree or the install)."""
    return Path(__file__).resolve().parent.parent / "models" / "default_bundle"


# Where a multi-process launcher (`accelerate launch`, torchrun, mpirun) puts each process's global rank.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def process_rank() -> int:
    """This process's global rank in a multi-process launch (0 when launched alone)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def setup_logging(verbose: bool = False, rank: int | None = None) -> None:
    """Log to stderr at INFO (DEBUG with -v) on the main process and at WARNING on every other process of a
    multi-process run, so that each progress line appears once; `rank` defaults to the launcher's."""
    rank = process_rank() if rank is None else rank
    level = logging.WARNING if rank > 0 else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a handler was already installed
    for noisy in ("accelerate", "httpx", "PIL"):  # per-checkpoint and per-request chatter
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose and rank == 0 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lesionlab` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipelines.config import ConfigError
    from pipelines.images import ImageError
    from pipelines.manifest import ManifestError

    try:
        args.func(args)
    except (CliError, ConfigError, ManifestError, ImageError, FileNotFoundError, ValueError, KeyError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lesionlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
