"""The synthesis stages of `lesionlab run`: LoRA fine-tuning (`lora:` section) and synthetic rows (`synthesis:`
section), each `fn(config, run_dir, manifest_path=None) -> StageOutputs` (the contract of `pipelines.stage`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.config import FinetuneConfig, SynthesisConfig, stage_settings
from pipelines.stage import StageOutputs
from pipelines.synthesis.filters import MemorisationGuard, make_embedder
from pipelines.synthesis.flux import LORA_WEIGHTS_NAME
from pipelines.synthesis.folder import add_synthetic_folder, synthetic_rows_from_folder
from pipelines.synthesis.generation import REPORT_FILE, synthesize
from pipelines.synthesis.lora_training import finetune_lora

__all__ = ["run_finetune_stage", "run_synthesis_stage"]


def run_finetune_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> StageOutputs:
    """Fine-tune the LoRA on `manifest_path` (default `run_dir/manifest_captioned.csv`) into `run_dir/lora`; the
    manifest is unchanged, so the outputs name the LoRA file only."""
    from pipelines.manifest import read_manifest

    settings = stage_settings(config, "lora", FinetuneConfig)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path) if manifest_path else run_dir / "manifest_captioned.csv"
    result = finetune_lora(read_manifest(manifest_path), run_dir / "lora", settings)
    return StageOutputs(files={"lora": result.lora_path},
                        summary={"global_step": result.global_step,
                                 "final_loss": result.losses[-1] if result.losses else None})


def run_synthesis_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> StageOutputs:
    """Generate (or take from a folder) synthetic training rows; the next stage reads
    `run_dir/manifest_synthetic.csv`, and `run_dir/synthesis/synthesis_report.json` says what was kept."""
    from pipelines.manifest import read_manifest, write_manifest

    settings = stage_settings(config, "synthesis", SynthesisConfig)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path) if manifest_path else run_dir / "manifest_captioned.csv"
    if settings.lora is None and (run_dir / "lora" / LORA_WEIGHTS_NAME).is_file():
        settings = settings.model_copy(update={"lora": str(run_dir / "lora" / LORA_WEIGHTS_NAME)})
    manifest = read_manifest(manifest_path)
    if settings.folder:
        rows = synthetic_rows_from_folder(
            settings.folder, settings.folder_csv, settings.class_column, settings.path_column
        )
        guard = MemorisationGuard(make_embedder(settings.embedding), settings.memorisation_threshold)
        combined, stats = add_synthetic_folder(manifest, rows, guard)
        (run_dir / "synthesis").mkdir(parents=True, exist_ok=True)
        (run_dir / "synthesis" / REPORT_FILE).write_text(json.dumps({"folder": stats}, indent=2))
    else:
        combined, _ = synthesize(manifest, run_dir / "synthesis", settings)
    return StageOutputs(manifest=write_manifest(combined, run_dir / "manifest_synthetic.csv"),
                        files={"synthesis_report": run_dir / "synthesis" / REPORT_FILE},
                        summary={"synthetic_rows_added": len(combined) - len(manifest)})
