"""`lesionlab run`: every enabled stage in pipeline order, in one run directory, re-running only what changed.

Each finished stage writes `stages/<name>.json`: its outputs (paths relative to the run directory) and a
`provenance` block (the config sections it reads and their SHA-256, the SHA-256 of its inputs, the code version and
the attempt, `configs/attempt-<n>.yaml`, whose config produced it). A stage is reused only when that record matches
the current config and inputs; otherwise it runs again, and so does every stage after it.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig, RunConfig
from pipelines.manifest import read_dataset
from pipelines.provenance import (
    atomic_write_text,
    changed_fields,
    code_version,
    config_sections,
    describe_input,
    record_attempt,
    run_relative,
    value_sha256,
)
from pipelines.stage import StageOutputs

log = logging.getLogger(__name__)

StageFn = Callable[[RunConfig, Path, Path | None], StageOutputs]
UNKNOWN_PROVENANCE = "its marker has no provenance record (written by an older lesionlab): unknown provenance"


class StaleStageError(ValueError):
    """A finished stage whose recorded provenance differs from the current run, refused under `--no-rerun`."""


def stage_ingest(config: RunConfig, run_dir: Path, manifest: Path | None) -> StageOutputs:
    """Read the dataset layout into a manifest and split it by group."""
    from pipelines.manifest import grouped_split, write_manifest

    data = config.data
    df = read_dataset(data)
    if data.format != "manifest" or (df.split == "").any():
        df = grouped_split(df, config.split.val_fraction, config.split.test_fraction, config.split.seed)
    path = write_manifest(df, run_dir / "manifest.csv")
    counts = df.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict(orient="index")
    return StageOutputs(manifest=path, summary={"counts": counts})


def _plugin(target: str) -> StageFn:
    """A stage implemented in another module, called as fn(config, run_dir, manifest) -> StageOutputs."""

    def run(config: RunConfig, run_dir: Path, manifest: Path | None) -> StageOutputs:
        module_name, function = target.split(":")
        outputs = getattr(importlib.import_module(module_name), function)(config, run_dir, manifest)
        if not isinstance(outputs, StageOutputs):
            raise TypeError(f"stage {target} returned {type(outputs).__name__}, not StageOutputs")
        return outputs

    return run


def stage_train(config: RunConfig, run_dir: Path, manifest: Path | None) -> StageOutputs:
    """Train the classifier on the current manifest; write bundle and report."""
    from pipelines.training import train_from_config

    bundle = train_from_config(config, run_dir, manifest)
    return StageOutputs(bundle=bundle, report=run_dir / "report" / "report.md")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its function, the config sections it reads, what it consumes and where it keeps the
    state a killed run resumes from (run-relative paths, discarded when the stage re-runs with other settings)."""

    name: str
    enabled: Callable[[RunConfig], bool]
    function: StageFn
    sections: tuple[str, ...]
    reads_bundle: bool = False
    resume_state: tuple[str, ...] = ()


# In pipeline order.
STAGES: list[Stage] = [
    Stage("ingest", lambda c: c.mil is None, stage_ingest, ("data", "split")),  # MIL runs read mil.data instead
    Stage("captions", lambda c: c.captions is not None, _plugin("pipelines.captions:run_caption_stage"),
          ("captions",)),
    Stage("lora", lambda c: c.lora is not None, _plugin("pipelines.synthesis:run_finetune_stage"), ("lora",),
          resume_state=("lora/checkpoints",)),
    Stage("synthesis", lambda c: c.synthesis is not None, _plugin("pipelines.synthesis:run_synthesis_stage"),
          ("synthesis",)),
    Stage("train", lambda c: c.mil is None, stage_train, ("data", "model", "training"),
          resume_state=("checkpoints", "tensorboard")),
    Stage("mil", lambda c: c.mil is not None, _plugin("pipelines.mil:run_mil_stage"), ("split", "training", "mil"),
          resume_state=("checkpoints", "tensorboard")),
    Stage("balancing", lambda c: c.balancing is not None, _plugin("pipelines.balancing:run_balancing_stage"),
          ("balancing", "training"), reads_bundle=True),
    Stage("pruning", lambda c: c.pruning is not None, _plugin("pipelines.pruning:run_pruning_stage"), ("pruning",),
          reads_bundle=True),
]


def get_stage(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage '{name}'; stages are {[s.name for s in STAGES]}")


def _source_input(data: DataConfig, run_dir: Path) -> dict[str, Any] | None:
    """What the ingest stage reads: the manifest or metadata file, or for class folders their file list and sizes."""
    if data.format == "manifest":
        return describe_input(data.manifest, run_dir)
    if data.format == "ham10000":
        return describe_input(data.metadata or Path(data.root) / "metadata.csv", run_dir)
    root = Path(data.root)
    if not root.is_dir():
        return {"path": run_relative(root, run_dir), "sha256": None}
    listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return {"path": run_relative(root, run_dir), "sha256": value_sha256(listing)}


def stage_provenance(stage: Stage, config: RunConfig, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
    """The current config sections and input hashes of a stage, and their fingerprint."""
    inputs: dict[str, Any] = {}
    if stage.name == "ingest":
        inputs["source"] = _source_input(config.data, run_dir)
    elif manifest is not None:
        inputs["manifest"] = describe_input(manifest, run_dir)
    if stage.reads_bundle:
        inputs["bundle"] = describe_input(run_dir / "bundle" / "weights.safetensors", run_dir)
    sections = config_sections(config, stage.sections)
    fingerprint = value_sha256({"config": sections, "inputs": {k: v["sha256"] for k, v in inputs.items()}})
    return {"config": sections, "config_sha256": {k: value_sha256(v) for k, v in sections.items()},
            "inputs": inputs, "fingerprint": fingerprint}


def why_stale(marker: dict[str, Any], current: dict[str, Any], config_only: bool = False) -> str | None:
    """Why a finished stage's marker no longer describes what the current run would produce (None if it does)."""
    recorded = marker.get("provenance")
    if not isinstance(recorded, dict) or not isinstance(marker.get("outputs"), dict):
        return UNKNOWN_PROVENANCE
    reasons = []
    changes = changed_fields(recorded.get("config", {}), current["config"])
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        reasons.append(f"config changed: {shown}")
    if not config_only:
        old = {k: (v or {}).get("sha256") for k, v in recorded.get("inputs", {}).items()}
        new = {k: (v or {}).get("sha256") for k, v in current["inputs"].items()}
        for key in sorted(set(old) | set(new)):
            where = (current["inputs"].get(key) or recorded["inputs"].get(key) or {}).get("path")
            if new.get(key) is None and old.get(key) is not None:
                # e.g. a copied run resumed where its source data is not reachable: its outputs are still its own
                log.warning("input %s '%s' not found: cannot verify it is unchanged; its recorded hash is kept", key,
                            where)
            elif old.get(key) != new.get(key):
                reasons.append(f"input {key} '{where}' changed")
    return ", ".join(reasons) or None


def _read_marker(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged marker is treated like one without provenance
    return marker if isinstance(marker, dict) else {}


def _refusal(stage: str, run_dir: Path, reason: str) -> StaleStageError:
    return StaleStageError(f"stage '{stage}' in '{run_dir}' is stale ({reason}); run without --no-rerun to redo it "
                           "and every stage after it, or use a new --run-dir")


def _discard_resume_state(stage: Stage, run_dir: Path, previous: str | None, current: str) -> None:
    """Remove a stage's resume state (checkpoints) unless it was written for exactly the current provenance."""
    if previous == current:
        return
    for relative in stage.resume_state:
        path = run_dir / relative
        if path.exists():
            log.info("stage %s: discarding %s (written with other settings or inputs)", stage.name, path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def launched_processes() -> Any:
    """Accelerate's process state when this is one of several launched processes (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


@dataclass
class StageResult:
    """What `run_stage` did: the stage's outputs (paths resolved in the run directory), whether it ran, and the
    attempt whose config it ran with (None when reused)."""

    outputs: StageOutputs
    ran: bool
    attempt: int | None = None


def run_stage(
    name: str,
    config: RunConfig,
    run_dir: str | Path,
    manifest: str | Path | None = None,
    *,
    rerun: bool = True,
    upstream: str | None = None,
    force: str | None = None,
    attempt: int | None = None,
) -> StageResult:
    """Run one stage in a run directory, or reuse its outputs when its marker matches the current provenance.

    `upstream` names an earlier stage that ran in this attempt (then a finished stage runs again); `force` gives a
    reason to run regardless. With `rerun=False` a stale finished stage raises StaleStageError instead. `attempt` is
    the attempt number of this run's config; when None and the stage runs, the config is recorded as a new attempt.
    """
    stage = get_stage(name)
    run_dir = Path(run_dir)
    stages_dir = run_dir / "stages"
    marker_path = stages_dir / f"{name}.json"
    pending_path = stages_dir / "pending" / f"{name}.json"
    manifest = Path(manifest) if manifest is not None else None
    current = stage_provenance(stage, config, run_dir, manifest)
    marker = _read_marker(marker_path)
    if marker is not None and force is None:
        reason = f"stage '{upstream}' before it ran in this attempt" if upstream else why_stale(marker, current)
        if reason is None:
            recorded = marker["provenance"]
            if recorded.get("code") != code_version():
                log.info("stage %s: outputs from code version %s reused (now %s)", name, recorded.get("code"),
                         code_version())
            log.info("stage %s: already complete with the same config and inputs, skipped", name)
            return StageResult(StageOutputs.from_record(marker.get("outputs", {}), run_dir), ran=False)
        if not rerun:
            raise _refusal(name, run_dir, reason)
        log.info("stage %s: re-running, with every stage after it: %s", name, reason)
    else:
        log.info("stage %s: running%s", name, f" ({force})" if force else "")

    processes = launched_processes()
    main = processes is None or processes.is_main_process
    if main:  # under `accelerate launch` one process keeps the books, the others wait for it
        pending = _read_marker(pending_path) or {}
        previous = pending.get("fingerprint") or ((marker or {}).get("provenance") or {}).get("fingerprint")
        _discard_resume_state(stage, run_dir, previous, current["fingerprint"])
        marker_path.unlink(missing_ok=True)
        if attempt is None:
            attempt = record_attempt(config, run_dir)
        atomic_write_text(pending_path, json.dumps({"fingerprint": current["fingerprint"], "attempt": attempt}))
    if processes is not None:
        processes.wait_for_everyone()

    outputs = stage.function(config, run_dir, manifest)
    if main:
        provenance = {**current, "code": code_version(), "attempt": attempt,
                      "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        record = {"outputs": outputs.to_record(run_dir), "provenance": provenance}
        atomic_write_text(marker_path, json.dumps(record, indent=2, default=str))
        pending_path.unlink(missing_ok=True)
    return StageResult(outputs, ran=True, attempt=attempt)


def run_pipeline(
    config: RunConfig, run_dir: str | Path | None = None, rerun: bool = True
) -> dict[str, StageOutputs]:
    """Run the enabled stages in order, reusing each finished stage whose recorded provenance still matches.

    A stage whose config sections or inputs changed — or whose marker has no provenance record — runs again, and so
    does every enabled stage after it; with `rerun=False` such a stage is refused (StaleStageError) before anything
    runs where the change is visible up front. `config.yaml` is rewritten only when a stage runs.
    """
    run_dir = Path(run_dir or config.run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    stages = [stage for stage in STAGES if stage.enabled(config)]
    if not rerun:  # refuse config changes before any stage runs or anything is written
        for stage in stages:
            marker = _read_marker(run_dir / "stages" / f"{stage.name}.json")
            if marker is not None:
                current = {"config": config_sections(config, stage.sections), "inputs": {}}
                reason = why_stale(marker, current, config_only=True)
                if reason:
                    raise _refusal(stage.name, run_dir, reason)
    manifest: Path | None = None
    done: dict[str, StageOutputs] = {}
    attempt: int | None = None
    upstream: str | None = None
    for i, stage in enumerate(stages):
        marker_path = run_dir / "stages" / f"{stage.name}.json"
        if upstream is None and not marker_path.is_file():
            # This stage runs for the first time: finished stages after it were built on other inputs.
            later = [s.name for s in stages[i + 1:] if (run_dir / "stages" / f"{s.name}.json").is_file()]
            if later and not rerun:
                raise _refusal(later[0], run_dir, f"stage '{stage.name}' before it has not run yet")
        result = run_stage(stage.name, config, run_dir, manifest, rerun=rerun, upstream=upstream, attempt=attempt)
        if result.ran:
            attempt = result.attempt
            upstream = upstream or stage.name
        if result.outputs.manifest is not None:
            manifest = result.outputs.manifest
        done[stage.name] = result.outputs
    return done
