"""`lesionlab run`: every enabled stage in pipeline order, in one run directory, skipping stages already complete."""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import RunConfig, dump_config

log = logging.getLogger(__name__)

StageFn = Callable[[RunConfig, Path, Path | None], dict[str, Any]]


def stage_ingest(config: RunConfig, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
    """Read the dataset layout into a manifest and split it by group."""
    from pipelines.manifest import (
        grouped_split,
        ingest_class_folders,
        ingest_ham10000,
        read_manifest,
        write_manifest,
    )

    data = config.data
    if data.format == "manifest":
        df = read_manifest(data.manifest)
    elif data.format == "ham10000":
        df = ingest_ham10000(data.root, data.metadata, data.images, tuple(data.malignant_classes))
    else:
        df = ingest_class_folders(data.root)
    if data.format != "manifest" or (df.split == "").any():
        df = grouped_split(df, config.split.val_fraction, config.split.test_fraction, config.split.seed)
    path = write_manifest(df, run_dir / "manifest.csv")
    counts = df.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict(orient="index")
    return {"manifest": str(path), "counts": counts}


def _plugin(target: str) -> StageFn:
    """A stage implemented in another module, called as fn(config, run_dir, manifest) -> outputs."""

    def run(config: RunConfig, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
        module_name, function = target.split(":")
        outputs = getattr(importlib.import_module(module_name), function)(config, run_dir, manifest)
        return outputs if isinstance(outputs, dict) else {"manifest": str(outputs)}

    return run


def stage_train(config: RunConfig, run_dir: Path, manifest: Path | None) -> dict[str, Any]:
    """Train the classifier on the current manifest; write bundle and report."""
    from pipelines.training import train_from_config

    bundle = train_from_config(config, run_dir, manifest)
    return {"bundle": str(bundle), "report": str(run_dir / "report" / "report.md")}


# (name, is-enabled, function), in pipeline order.
STAGES: list[tuple[str, Callable[[RunConfig], bool], StageFn]] = [
    ("ingest", lambda c: c.mil is None, stage_ingest),  # MIL runs read their own slides (mil.data)
    ("captions", lambda c: c.captions is not None, _plugin("pipelines.captions:run_caption_stage")),
    ("lora", lambda c: c.lora is not None, _plugin("pipelines.synthesis:run_finetune_stage")),
    ("synthesis", lambda c: c.synthesis is not None, _plugin("pipelines.synthesis:run_synthesis_stage")),
    ("train", lambda c: c.mil is None, stage_train),
    ("mil", lambda c: c.mil is not None, _plugin("pipelines.mil:run_mil_stage")),
    ("balancing", lambda c: c.balancing is not None, _plugin("pipelines.balancing:run_balancing_stage")),
    ("pruning", lambda c: c.pruning is not None, _plugin("pipelines.pruning:run_pruning_stage")),
]


def run_pipeline(config: RunConfig, run_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Run the enabled stages; a stage whose marker `stages/<name>.json` exists is skipped (its outputs reused)."""
    run_dir = Path(run_dir or config.run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    manifest: Path | None = None
    done: dict[str, dict[str, Any]] = {}
    for name, enabled, function in STAGES:
        if not enabled(config):
            continue
        marker = run_dir / "stages" / f"{name}.json"
        if marker.is_file():
            outputs = json.loads(marker.read_text())
            log.info("stage %s: already complete, skipped", name)
        else:
            log.info("stage %s: running", name)
            outputs = function(config, run_dir, manifest)
            tmp = marker.with_name(f".{marker.name}.tmp")
            tmp.write_text(json.dumps(outputs, indent=2, default=str))
            os.replace(tmp, marker)
        if outputs.get("manifest"):
            manifest = Path(outputs["manifest"])
        done[name] = outputs
    return done
