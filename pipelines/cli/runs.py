"""`lesionlab run | train | cv | evaluate | ensemble`: config-driven runs and the evaluation of bundles."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import add_config_arguments, load_run_config

__all__ = ["ENGINES", "add_cli", "add_engine_argument", "add_tta_argument"]

ENGINES = ["auto", "eager", "onnx", "int8"]


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """--tta: the bundle's own setting unless given."""
    p.add_argument("--tta", type=int, choices=[1, 8], help="test-time-augmentation views (default: the bundle's "
                   "own setting, which its calibration and threshold were fitted with)")


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    """--engine: which runtime runs the network."""
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="network runtime: auto uses the bundle's exported ONNX file when it has one (see `lesionlab "
                   "export`), else eager PyTorch")


def _cmd_run(args: argparse.Namespace) -> None:
    from pipelines.run import run_pipeline

    config, run_dir = load_run_config(args)
    outputs = run_pipeline(config, run_dir, rerun=not args.no_rerun)
    print(f"run directory: {run_dir}")
    for stage, result in outputs.items():
        for key in ("bundle", "report", "manifest"):
            if getattr(result, key) is not None:
                print(f"  {stage}: {key} -> {getattr(result, key)}")


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.run import run_stage, stage_ingest

    config, run_dir = load_run_config(args)
    if config.mil is not None:  # a MIL config trains its bag classifier: the `mil` stage, as `mil-train` runs it
        trained = run_stage("mil", config, run_dir, None, force="lesionlab train always trains").outputs
        print(f"bundle: {trained.bundle}\nreport: {trained.report}")
        return
    if args.manifest:
        manifest = Path(args.manifest)
    else:
        manifest = stage_ingest(config, run_dir, None).manifest
    # As the `run` train stage: writes config.yaml and stages/train.json, discards checkpoints of other settings.
    trained = run_stage("train", config, run_dir, manifest, force="lesionlab train always trains").outputs
    print(f"bundle: {trained.bundle}\nreport: {trained.report}")


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


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from pipelines.ensemble import build_ensemble

    card = build_ensemble(args.members, args.data, args.out, args.target_sensitivity)
    summary = {split: {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
               for split, metrics in card["metrics"].items()}
    print(f"ensemble bundle: {args.out}\n{summary}")



def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `run`, `train`, `cv`, `evaluate` and `ensemble`."""
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
    add_tta_argument(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals (0: none)")
    add_engine_argument(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ensemble", help="combine trained bundles into one ensemble bundle (mean of calibrated "
                       "probabilities) with a threshold chosen on validation")
    p.add_argument("--members", nargs="+", required=True, help="two or more image bundles trained on --data")
    p.add_argument("--data", required=True, help="the manifest the members were trained on (its val/test rows)")
    p.add_argument("--out", required=True, help="ensemble bundle folder to write")
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.set_defaults(func=_cmd_ensemble)

