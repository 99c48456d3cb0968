"""Rare-class generation: plan how many images each class needs, generate them in rounds with fixed seeds, pass them
through the memorisation guard and the quality filter, and append the accepted ones to the training split as
`source=synthetic` rows with their provenance (prompt, seed, LoRA hash, base, nearest-real similarity)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.config import SynthesisConfig
from pipelines.manifest import ManifestError, append_train_rows
from pipelines.provenance import file_sha256
from pipelines.synthesis.filters import MemorisationGuard, QualityFilter, make_embedder
from pipelines.synthesis.flux import (
    check_resolution,
    fit_captions_to_pipe,
    load_flux_pipeline,
    lora_weights_file,
    torch_dtype,
)

__all__ = ["REPORT_FILE", "SynthesisReport", "generate_images", "plan_counts", "synthesize", "with_label_columns"]

log = logging.getLogger(__name__)

REPORT_FILE = "synthesis_report.json"
STAT_KEYS = ("generated", "dropped_memorisation", "dropped_quality", "accepted")


def plan_counts(
    manifest: pd.DataFrame,
    min_ratio: float,
    max_per_class: int | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, int]:
    """Synthetic images per class so that each class has >= min_ratio x the largest class's training images."""
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio {min_ratio} must be in (0, 1]")
    train = manifest[manifest.split == "train"]
    counts = train.label.value_counts()
    if counts.empty:
        raise ManifestError("the manifest has no split=train rows to balance")
    unknown = sorted(set(classes or []) - set(counts.index))
    if unknown:
        raise ValueError(f"classes {unknown} have no training images; known classes: {sorted(counts.index)}")
    target = math.ceil(min_ratio * int(counts.max()))
    plan = {}
    for label in sorted(classes or counts.index):
        missing = max(0, target - int(counts[label]))
        if max_per_class is not None:
            missing = min(missing, max_per_class)
        if missing:
            plan[label] = missing
    return plan


@dataclass
class SynthesisReport:
    """Per class: real training images, requested, generated, dropped by each filter, accepted."""

    per_class: dict[str, dict[str, int]]
    lora_sha256: str | None
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        totals = {key: sum(c[key] for c in self.per_class.values()) for key in next(iter(self.per_class.values()), {})}
        return {"per_class": self.per_class, "totals": totals, "lora_sha256": self.lora_sha256, "rounds": self.rounds}


def with_label_columns(manifest: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Copy per-class columns (`malignant`) from the manifest's real rows, so added rows keep the column's dtype."""
    if "malignant" not in manifest.columns or rows.empty:
        return rows
    by_label = manifest[manifest.source == "real"].drop_duplicates("label").set_index("label")["malignant"]
    values = np.asarray([by_label[label] for label in rows.label], dtype=manifest["malignant"].dtype)
    return rows.assign(malignant=values)


def _prompt_pool(manifest: pd.DataFrame, label: str) -> list[str]:
    """The class's training captions, or one plain prompt when it has none."""
    train = manifest[(manifest.split == "train") & (manifest.source == "real") & (manifest.label == label)]
    if "caption" in train.columns:
        captions = [c for c in train.caption.astype(str) if c.strip()]
        if captions:
            return captions
    log.warning("class '%s' has no captions in the training split; using a plain prompt", label)
    return [f"This photo depicts a skin lesion. The diagnosis is {label}."]


def _prompt_pools(manifest: pd.DataFrame, plan: dict[str, int], pipe: Any, max_sequence_length: int
                  ) -> dict[str, list[str]]:
    """Per planned class, its prompts fitted (all at once) to the pipeline's text encoders."""
    pools = {label: _prompt_pool(manifest, label) for label in plan}
    prompts = [prompt for pool in pools.values() for prompt in pool]
    fitted = iter(fit_captions_to_pipe(pipe, prompts, max_sequence_length))
    return {label: [next(fitted) for _ in pool] for label, pool in pools.items()}


def generate_images(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: SynthesisConfig
) -> list[Image.Image]:
    """One image per (prompt, seed), in batches; each image's noise comes from its own seeded generator."""
    import torch

    images: list[Image.Image] = []
    for start in range(0, len(prompts), settings.batch_size):
        batch_prompts = list(prompts[start : start + settings.batch_size])
        batch_seeds = seeds[start : start + len(batch_prompts)]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in batch_seeds]
        result = pipe(
            prompt=batch_prompts,
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            max_sequence_length=settings.max_sequence_length,
            generator=generators,
            joint_attention_kwargs={"scale": settings.lora_scale} if settings.lora else None,
            output_type="pil",
        )
        images.extend(result.images)
    return images


def _class_stats(manifest: pd.DataFrame, plan: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per planned class: its real training images, the requested count and zeroed counters."""
    real_train = manifest[(manifest.split == "train") & (manifest.source == "real")]
    return {label: {"real": int((real_train.label == label).sum()), "requested": n, **dict.fromkeys(STAT_KEYS, 0)}
            for label, n in plan.items()}


def _round_jobs(plan: dict[str, int], per_class: dict[str, dict[str, int]], pools: dict[str, list[str]],
                next_seed: dict[str, int], rng: np.random.Generator, seed: int) -> list[tuple[str, str, int]]:
    """(class, prompt, seed) for every image still missing; advances `next_seed`."""
    jobs = []
    for label in plan:
        for _ in range(plan[label] - per_class[label]["accepted"]):
            # Seeds are class offset + counter: stable, distinct across classes, reproducible per image.
            image_seed = seed + 1_000_000 * (sorted(plan).index(label) + 1) + next_seed[label]
            next_seed[label] += 1
            jobs.append((label, pools[label][int(rng.integers(len(pools[label])))], image_seed))
    return jobs


def _generate_round(pipe: Any, jobs: list[tuple[str, str, int]], guard: MemorisationGuard,
                    quality: QualityFilter | None, settings: SynthesisConfig, image_dir: Path, desc: str,
                    show_progress: bool) -> list[dict[str, Any]]:
    """Generate and filter this process's jobs; saves the accepted images and returns one record per image."""
    import torch
    from tqdm import tqdm

    records = []
    step = max(1, settings.batch_size)
    for start in tqdm(range(0, len(jobs), step), desc=desc, disable=not show_progress):
        batch = jobs[start : start + settings.batch_size]
        with torch.inference_mode():
            images = generate_images(pipe, [j[1] for j in batch], [j[2] for j in batch], settings)
        keep, sims = guard.keep(images)
        quality_keep = np.ones(len(images), bool)
        if quality is not None:
            quality_keep, _ = quality.keep(images, [j[0] for j in batch])
        for (label, prompt, seed), image, k, s, q in zip(batch, images, keep, sims, quality_keep, strict=True):
            record = {"label": label, "prompt": prompt, "seed": seed, "similarity": float(s),
                      "memorised": bool(not k), "off_class": bool(k and not q), "path": ""}
            if k and q:
                path = image_dir / label / f"syn_{label}_{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                record["path"] = str(path.resolve())
            records.append(record)
    return records


def _merge_round(parts: Path, round_index: int, per_class: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """Count every process's records of a round into `per_class`; returns the accepted records."""
    accepted = []
    for part in sorted(parts.glob(f"round{round_index}_rank*.json")):
        for record in json.loads(part.read_text()):
            stats = per_class[record["label"]]
            stats["generated"] += 1
            stats["dropped_memorisation"] += record["memorised"]
            stats["dropped_quality"] += record["off_class"]
            if record["path"]:
                stats["accepted"] += 1
                accepted.append(record)
    return accepted


def _synthetic_rows(manifest: pd.DataFrame, accepted: list[dict[str, Any]], lora_hash: str | None,
                    settings: SynthesisConfig) -> pd.DataFrame:
    """Manifest rows (split=train, source=synthetic, with provenance) of the accepted images."""
    rows = pd.DataFrame([
        {
            "image_id": Path(r["path"]).stem,
            "path": r["path"],
            "label": r["label"],
            "group": Path(r["path"]).stem,
            "split": "train",
            "source": "synthetic",
            "caption": r["prompt"],
            "prompt": r["prompt"],
            "seed": r["seed"],
            "lora_sha256": lora_hash or "",
            "synthesis_base": str(settings.base),
            "max_real_similarity": round(r["similarity"], 4),
        }
        for r in accepted
    ])
    if len(rows):
        # Nullable integers: concatenated with real rows (no seed), plain ints would become floats ("1000000.0").
        rows["seed"] = rows["seed"].astype("Int64")
    return with_label_columns(manifest, rows)


def _write_report(out_dir: Path, report: SynthesisReport) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))


def synthesize(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    settings: SynthesisConfig,
    pipe: Any = None,
    counts: dict[str, int] | None = None,
) -> tuple[pd.DataFrame, SynthesisReport]:
    """Generate per-class images (`counts`, default `plan_counts`), filter them, and return the manifest with
    `source=synthetic, split=train` rows; writes the images and `synthesis_report.json` into `out_dir`."""
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    plan = counts if counts is not None else plan_counts(manifest, settings.min_ratio, settings.max_per_class,
                                                         settings.classes)
    per_class = _class_stats(manifest, plan)
    lora_hash = file_sha256(lora_weights_file(settings.lora)) if settings.lora else None
    if not plan:
        log.info("every class already reaches %.0f %% of the largest; nothing to generate", 100 * settings.min_ratio)
        report = SynthesisReport(per_class, lora_hash, 0)
        _write_report(out_dir, report)
        return manifest.copy(), report

    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    if pipe is None:
        pipe = load_flux_pipeline(settings.base, torch_dtype(settings.mixed_precision), accelerator.device,
                                  settings.lora)
    check_resolution(pipe, settings.resolution)
    real_train = manifest[(manifest.split == "train") & (manifest.source == "real")]
    guard = MemorisationGuard(make_embedder(settings.embedding), settings.memorisation_threshold)
    guard.fit(real_train.path.tolist())
    quality = QualityFilter(settings.quality_bundle, settings.quality_confidence) if settings.quality_bundle else None
    pools = _prompt_pools(manifest, plan, pipe, settings.max_sequence_length)
    rng, next_seed = np.random.default_rng(settings.seed), dict.fromkeys(plan, 0)
    parts, accepted, rounds = out_dir / "parts", [], 0
    for round_index in range(1, settings.max_rounds + 1):
        jobs = _round_jobs(plan, per_class, pools, next_seed, rng, settings.seed)
        if not jobs:
            break
        rounds = round_index
        with accelerator.split_between_processes(jobs) as mine:
            records = _generate_round(pipe, mine, guard, quality, settings, out_dir / "images",
                                      f"synthesis round {round_index}", accelerator.is_local_main_process)
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"round{round_index}_rank{accelerator.process_index}.json").write_text(json.dumps(records))
        accelerator.wait_for_everyone()
        accepted += _merge_round(parts, round_index, per_class)

    for label, stats in per_class.items():
        if stats["accepted"] < stats["requested"]:
            log.warning("class '%s': %d of %d synthetic images accepted after %d rounds", label, stats["accepted"],
                        stats["requested"], rounds)
    report = SynthesisReport(per_class, lora_hash, rounds)
    new_rows = _synthetic_rows(manifest, accepted, lora_hash, settings)
    if accelerator.is_main_process:
        _write_report(out_dir, report)
    combined = append_train_rows(manifest, new_rows) if len(new_rows) else manifest.copy()
    return combined, report
