"""`lesionlab caption | finetune-lora | synthesize | synth-report`: ABCD captions, FLUX.1 LoRA, synthetic lesions
and the report that judges them. Stage flags come from the config models (`pipelines.config`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.cli.common import add_model_arguments, settings_from_args
from pipelines.config import CaptionConfig, FinetuneConfig, SynthesisConfig, SynthReportConfig

__all__ = ["add_cli"]

log = logging.getLogger("lesionlab")


def _cmd_caption(args: argparse.Namespace) -> None:
    from pipelines.captions import LLMRewriter, caption_manifest
    from pipelines.manifest import read_manifest, write_manifest

    settings = settings_from_args(CaptionConfig, args, "captions")
    rewriter = LLMRewriter(settings.llm, settings.llm_max_new_tokens) if settings.llm else None
    df = caption_manifest(read_manifest(args.manifest), settings.splits, settings.malignant_classes, rewriter)
    log.info("wrote %s", write_manifest(df, args.out))


def _cmd_finetune(args: argparse.Namespace) -> None:
    from pipelines.manifest import read_manifest
    from pipelines.synthesis import finetune_lora

    settings = settings_from_args(FinetuneConfig, args, "lora")
    result = finetune_lora(read_manifest(args.manifest), args.out, settings)
    log.info("LoRA: %s (%d steps, last loss %.4f)", result.lora_path, result.global_step,
             result.losses[-1] if result.losses else float("nan"))


def _cmd_synthesize(args: argparse.Namespace) -> None:
    from pipelines.manifest import read_manifest, write_manifest
    from pipelines.synthesis import (
        MemorisationGuard,
        add_synthetic_folder,
        make_embedder,
        synthesize,
        synthetic_rows_from_folder,
    )

    settings = settings_from_args(SynthesisConfig, args, "synthesis")
    manifest = read_manifest(args.manifest)
    out_manifest = Path(args.out_manifest) if args.out_manifest else Path(args.out) / "manifest.csv"
    if settings.folder:
        rows = synthetic_rows_from_folder(settings.folder, settings.folder_csv, settings.class_column,
                                          settings.path_column)
        guard = None if args.no_guard else MemorisationGuard(make_embedder(settings.embedding),
                                                              settings.memorisation_threshold)
        combined, stats = add_synthetic_folder(manifest, rows, guard)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "synthesis_report.json").write_text(json.dumps({"folder": stats}, indent=2))
        log.info("added %d synthetic rows from %s", len(combined) - len(manifest), settings.folder)
    else:
        combined, report = synthesize(manifest, args.out, settings)
        log.info("synthesis: %s", json.dumps(report.to_dict()["totals"]))
    write_manifest(combined, out_manifest)
    log.info("wrote %s", out_manifest)


def _cmd_synth_report(args: argparse.Namespace) -> None:
    from pipelines.manifest import read_manifest
    from pipelines.synthesis import REPORT_MD, format_number, load_synthetic_rows, synth_report

    settings = settings_from_args(SynthReportConfig, args, "synth-report")
    manifest = read_manifest(args.manifest)
    synthetic = load_synthetic_rows(args.synthetic, args.synthetic_csv, args.class_column, args.path_column)
    report = synth_report(manifest, synthetic, args.out, settings,
                          sources={"manifest": args.manifest, "synthetic": args.synthetic})
    print(f"report: {Path(args.out) / REPORT_MD}")
    for label, c in report["classes"].items():
        kid = "—" if c["kid"] is None else f"{1e3 * c['kid']['mean']:.3g} ± {1e3 * c['kid']['se']:.2g}"
        print(f"  {label}: KID×10³ {kid}, precision {format_number(c['precision'])}, "
              f"recall {format_number(c['recall'])}, "
              f"likely copies {c['copies']['count']} of {c['n_synthetic']}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `caption`, `finetune-lora`, `synthesize` and `synth-report`."""
    p = sub.add_parser("caption", help="write ABCD captions (DermaFlux style) into a manifest")
    p.add_argument("--manifest", required=True, help="input manifest CSV")
    p.add_argument("--out", required=True, help="output manifest CSV with caption and abcd_* columns")
    add_model_arguments(p, CaptionConfig, skip=("enabled",), metavars={"malignant_classes": "CLASS"})
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser("finetune-lora", help="LoRA fine-tune FLUX.1 on captioned training images")
    p.add_argument("--manifest", required=True, help="captioned manifest (lesionlab caption)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors and checkpoints")
    add_model_arguments(p, FinetuneConfig, skip=("enabled",))
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("synthesize", help="generate synthetic training images for the rare classes")
    p.add_argument("--manifest", required=True, help="manifest with a train split (captions give the prompts)")
    p.add_argument("--out", required=True, help="folder for images and synthesis_report.json")
    p.add_argument("--out-manifest", help="manifest to write (default OUT/manifest.csv)")
    add_model_arguments(p, SynthesisConfig, skip=("enabled",))
    p.add_argument("--no-guard", action="store_true", help="skip the memorisation guard for --folder images")
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser("synth-report", help="judge a synthetic image set against the real training images "
                       "(KID, precision/recall, density/coverage, likely copies, quality-filter drops)")
    p.add_argument("--manifest", required=True, help="manifest whose split=train, source=real rows are the reference")
    p.add_argument("--synthetic", required=True, help="folder of <class>/<image> files (as `synthesize --folder` "
                   "reads), or a manifest CSV whose source=synthetic rows are judged")
    p.add_argument("--synthetic-csv", help="with a folder: CSV listing its images (path and class columns)")
    p.add_argument("--class-column", default="label")
    p.add_argument("--path-column", default="path")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the PNGs")
    add_model_arguments(p, SynthReportConfig)
    p.set_defaults(func=_cmd_synth_report)
