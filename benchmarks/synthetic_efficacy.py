r"""Synthetic-data efficacy: does adding M synthetic images per rare class help a classifier trained on N real images?

DermaFlux's protocol on our data. One grouped train/val/test split of the real images (lesion-level, fixed seed); for
every N, a stratified subsample of N real training images (fixed seed, the same rows for both arms); M synthetic
images for each rare class (below the median training count, or --rare-classes). For every N and training seed two
arms are trained with the library's trainer (`train_from_config`), same seed and schedule: "real only" and
"real + synthetic" (the same manifest plus the synthetic rows, split=train, source=synthetic). Both are scored on
the same real test rows; the change in balanced accuracy, malignant AUC and each rare class's recall comes with a
paired, class-stratified bootstrap interval per seed, and is pooled over seeds as mean and range.

Synthetic sources: `smote` (pixel-space SMOTE between each rare class's real training images), `tiny-flux` (captions
-> the tiny offline FLUX pipeline, or --flux-base), `folder:PATH` (PATH/<class>/<image>, e.g. a published set).
SMOTE and the tiny pipeline are a check of the harness, not of FLUX; the record says so.

Usage (about 15-20 minutes on a 2-core CPU; one torch thread avoids thread contention on a shared machine):
    python benchmarks/synthetic_efficacy.py --data ../shared/data/ham10000 --n-real 500 1000 \
        --synthetic-per-class 50 --source smote --seeds 0 1 2 --img-size 64 --epochs 8 --threads 1 \
        --out benchmarks/results/synthetic_efficacy/smote_64px

Runs (manifests, bundles, the shared image cache) go to --work (default runs/synthetic_efficacy/<name>); a run
whose settings and manifest are unchanged is read back instead of trained again, so a killed benchmark resumes.
The record (results.json with protocol, command, date and raw rows; results.md) goes to --out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import HAM10000_MALIGNANT as DEFAULT_MALIGNANT  # noqa: E402
from pipelines.synthesis.efficacy import (  # noqa: E402
    ARM_DIRS,
    ARMS,
    MIN_PER_CLASS,
    build_arm_manifests,
    paired_change,
    rare_classes_of,
    subsample_train,
)
from pipelines.synthesis.efficacy import REAL_ONLY as REAL  # noqa: E402
from pipelines.synthesis.efficacy import WITH_SYNTHETIC as SYNTHETIC  # noqa: E402

log = logging.getLogger("synthetic_efficacy")

HARNESS_CHECK = "a check of the harness, not of FLUX"
SOURCES = ("smote", "tiny-flux", "folder:PATH")


# --------------------------------------------------------------------------------------------------------------------
# Real rows: the grouped split (rare classes and the N-image subsample: `pipelines.synthesis.efficacy`)


def load_real_split(data: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15,
                    split_seed: int = 0) -> pd.DataFrame:
    """The HAM10000-layout folder `data` (metadata.csv + images/) as a manifest with a grouped train/val/test split."""
    from pipelines.manifest import grouped_split, ingest_ham10000

    return grouped_split(ingest_ham10000(data), val_fraction, test_fraction, seed=split_seed)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic rows: pixel-space SMOTE, the tiny FLUX pipeline, or a folder


def _real_train(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[(manifest.split == "train") & (manifest.source == "real")]


def smote_rows(manifest: pd.DataFrame, rare: Sequence[str], per_class: int, out_dir: str | Path, size: int = 32,
               seed: int = 0, k_neighbors: int = 5) -> pd.DataFrame:
    """`per_class` pixel-space SMOTE images for each rare class, interpolated between that class's real training
    images at `size` px (the geometry of `pipelines.balancing.pixel_smote`); PNGs and a contact sheet in `out_dir`."""
    from imblearn.over_sampling import SMOTE
    from PIL import Image
    from tqdm.auto import tqdm

    from pipelines.balancing import MAX_PIXEL_SMOTE_SIZE, contact_sheet
    from pipelines.data import ImageDataset
    from pipelines.transforms import EvalTransform

    if size > MAX_PIXEL_SMOTE_SIZE:
        raise ValueError(f"pixel-space SMOTE at {size} px: at most {MAX_PIXEL_SMOTE_SIZE} px is supported")
    train = _real_train(manifest)
    counts = train.label.value_counts()
    short = {c: int(counts.get(c, 0)) for c in rare if counts.get(c, 0) < MIN_PER_CLASS}
    if short:
        raise ValueError(f"pixel-space SMOTE needs at least {MIN_PER_CLASS} real training images per rare class, "
                         f"got {short}")
    # SMOTE draws neighbours within each class, so only the rare classes' images are loaded; imbalanced-learn wants
    # two classes, so a single rare class travels with one image of another class that is not resampled.
    rows = train[train.label.isin(rare)]
    if len(rare) == 1:
        rows = pd.concat([rows, train[~train.label.isin(rare)].head(1)])
    geometry = EvalTransform(size, [0.0] * 3, [1.0] * 3)
    dataset = ImageDataset(rows, sorted(rows.label.unique()), lambda image: image)
    pixels = np.stack([np.asarray(geometry.resize_crop(dataset.image(i)), dtype=np.float32).reshape(-1)
                       for i in tqdm(range(len(rows)), desc="loading rare-class images", leave=False)])
    k = min(k_neighbors, min(int(counts[c]) for c in rare) - 1)
    strategy = {c: int(counts[c]) + per_class for c in rare}
    sampler = SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=seed)
    new_x, new_y = sampler.fit_resample(pixels, rows.label.to_numpy())
    out_dir = Path(out_dir)
    added = []
    for i, (flat, label) in enumerate(zip(new_x[len(pixels):], new_y[len(pixels):], strict=True)):
        image_id = f"pixsmote-{label}-{i:05d}"
        path = out_dir / "images" / str(label) / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(size, size, 3)).save(path)
        added.append({"image_id": image_id, "path": str(path.resolve()), "label": str(label), "group": image_id,
                      "split": "train", "source": "synthetic",
                      "synthesis_base": f"pixel-space SMOTE ({size} px, k={k}, seed {seed})"})
    table = pd.DataFrame(added)
    contact_sheet(table, out_dir / "contact_sheet.png", 8, size)
    log.info("pixel-space SMOTE: %d images at %d px (k=%d) for %s", len(table), size, k, ", ".join(rare))
    return table


def tiny_flux_rows(manifest: pd.DataFrame, rare: Sequence[str], per_class: int, out_dir: str | Path, seed: int = 0,
                   base: str | Path | None = None, lora: str | None = None, steps: int = 4,
                   resolution: int | None = None) -> pd.DataFrame:
    """`per_class` generated images for each rare class: the rare classes' real training rows are captioned, and
    `pipelines.synthesis.synthesize` generates from those captions with `base` (default: the tiny offline pipeline,
    built into out_dir) through the memorisation guard. Returns the synthetic rows with their provenance."""
    from pipelines.captions import caption_manifest
    from pipelines.config import SynthesisConfig
    from pipelines.synthesis import synthesize
    from pipelines.synthesis.tiny_flux import TINY_IMAGE_SIZE, save_tiny_flux

    out_dir = Path(out_dir)
    if base is None:
        base = out_dir.parent / "tiny_flux"
        if not (Path(base) / "model_index.json").is_file():
            save_tiny_flux(base, seed=0)
    rare_train = (manifest.split == "train") & (manifest.source == "real") & manifest.label.isin(rare)
    captioned = pd.concat([caption_manifest(manifest[rare_train]), manifest[~rare_train]], ignore_index=True)
    settings = SynthesisConfig(base=str(base), lora=lora, resolution=resolution or TINY_IMAGE_SIZE,
                               num_inference_steps=steps, max_sequence_length=128, seed=seed, embedding="pixels")
    combined, report = synthesize(captioned, out_dir, settings, counts={c: per_class for c in rare})
    short = {c: s["accepted"] for c, s in report.per_class.items() if s["accepted"] < per_class}
    if short:
        raise ValueError(f"the generator gave fewer than {per_class} accepted images for {short}; see "
                         f"{out_dir / 'synthesis_report.json'}")
    return combined[combined.source == "synthetic"].reset_index(drop=True)


def folder_rows(manifest: pd.DataFrame, rare: Sequence[str], per_class: int, folder: str | Path,
                seed: int = 0) -> pd.DataFrame:
    """`per_class` images for each rare class drawn (fixed seed, without replacement) from `folder/<class>/<image>`."""
    from pipelines.synthesis import sample_per_class, synthetic_rows_from_folder

    rows = synthetic_rows_from_folder(folder)
    unknown = sorted(set(rows.label) - set(manifest.label))
    if unknown:
        log.warning("synthetic sub-folders %s are not classes of the data; they are not used", unknown)
    return sample_per_class(rows, rare, per_class, seed, where=f"'{folder}'")


def synthetic_rows(source: str, manifest: pd.DataFrame, rare: Sequence[str], per_class: int, out_dir: str | Path,
                   seed: int = 0, **options: Any) -> pd.DataFrame:
    """Synthetic training rows from `source` (smote, tiny-flux or folder:PATH) for the manifest's real training rows;
    `options` go to the source's function (smote: size, k_neighbors; tiny-flux: base, lora, steps, resolution)."""
    if per_class < 1:
        raise ValueError(f"--synthetic-per-class must be at least 1, got {per_class}")
    if source == "smote":
        return smote_rows(manifest, rare, per_class, out_dir, seed=seed, **options)
    if source == "tiny-flux":
        return tiny_flux_rows(manifest, rare, per_class, out_dir, seed=seed, **options)
    if source.startswith("folder:") and len(source) > len("folder:"):
        return folder_rows(manifest, rare, per_class, source.split(":", 1)[1], seed=seed)
    raise ValueError(f"unknown synthetic source '{source}'; expected one of {', '.join(SOURCES)}")


def source_name(source: str) -> str:
    """What a source is, in the record's words."""
    if source == "smote":
        return "pixel-space SMOTE"
    if source == "tiny-flux":
        return "the tiny offline FLUX pipeline"
    return f"ready-made synthetic images from {source.split(':', 1)[1]}"


def source_label(source: str) -> str:
    """The source's name; SMOTE and the tiny pipeline add that they only check the harness."""
    name = source_name(source)
    return name if source.startswith("folder:") else f"{name} ({HARNESS_CHECK})"


# --------------------------------------------------------------------------------------------------------------------
# Training and scoring one arm


@dataclass
class ArmSettings:
    """The classifier and schedule both arms share (small, CPU-friendly defaults)."""

    model: str = "small-cnn"
    img_size: int = 64
    widths: tuple[int, ...] | None = (16, 32, 64, 128)  # small-cnn only
    pretrained: bool = False
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    warmup_epochs: float = 0.5
    class_weighting: str = "none"
    tta: int = 1
    malignant_classes: tuple[str, ...] = DEFAULT_MALIGNANT
    device: str = "cpu"

    def run_config(self, manifest_path: Path, run_dir: Path, seed: int) -> Any:
        """The run config of one arm: every setting explicit; no early stop, so both arms train every epoch."""
        from pipelines.config import RunConfig

        kwargs = {"widths": list(self.widths)} if self.widths and self.model == "small-cnn" else {}
        return RunConfig.model_validate({
            "run_dir": str(run_dir),
            "seed": seed,
            "data": {"format": "manifest", "manifest": str(manifest_path),
                     "malignant_classes": list(self.malignant_classes)},
            "model": {"name": self.model, "img_size": self.img_size, "pretrained": self.pretrained, "kwargs": kwargs},
            "training": {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                         "warmup_epochs": self.warmup_epochs, "patience": self.epochs + 1, "seed": seed,
                         "device": self.device, "class_weighting": self.class_weighting, "sampler": "none",
                         "tta": self.tta, "num_workers": 0},
        })


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _test_rows_sha256(manifest_path: Path) -> str:
    """SHA-256 of the manifest's real test rows as written (the rows both arms must be scored on)."""
    import csv

    lines = manifest_path.read_text().splitlines()  # arm manifests hold no multi-line fields (no captions)
    fields = list(csv.reader(lines))
    split, source = fields[0].index("split"), fields[0].index("source")
    rows = [line for line, row in zip(lines[1:], fields[1:], strict=True)
            if row[split] == "test" and row[source] == "real"]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def run_arm(arm: str, manifest_path: str | Path, run_dir: str | Path, seed: int, settings: ArmSettings,
            cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one arm with `pipelines.training.train_from_config` and score its bundle on the real test split.

    Returns the arm's row: test metrics from the calibrated test probabilities (kept under `test_probs`, with
    `test_labels`), training minutes and the seed. A finished run with the same config and manifest is read back.
    `cache_dir` shares the decoded-image cache between runs (it is keyed by the rows and the size).
    """
    from pipelines.calibration import calibrated_probs
    from pipelines.evaluation import compute_metrics
    from pipelines.training import train_from_config

    manifest_path, run_dir = Path(manifest_path), Path(run_dir)
    config = settings.run_config(manifest_path, run_dir, seed)
    fingerprint = {"config": config.model_dump(mode="json"), "manifest_sha256": _sha256(manifest_path)}
    stamp, result_file = run_dir / "arm_config.json", run_dir / "arm.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != fingerprint:
        log.info("%s: settings or manifest changed; training afresh", run_dir)
        shutil.rmtree(run_dir)
    if not (stamp.is_file() and result_file.is_file()):
        run_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(fingerprint, indent=2))
        if cache_dir is not None and not (run_dir / "image_cache").exists():
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            os.symlink(Path(cache_dir).resolve(), run_dir / "image_cache", target_is_directory=True)
        started = time.perf_counter()
        train_from_config(config, run_dir, manifest_path)
        result_file.write_text(json.dumps({"wall_minutes": (time.perf_counter() - started) / 60}))
    card = json.loads((run_dir / "bundle" / "card.json").read_text())
    logits = np.load(run_dir / "report" / "logits.npz")
    labels, probs = logits["test_labels"], calibrated_probs(logits["test_logits"], card["calibration"])
    class_names, malignant = card["class_names"], card["malignant_classes"]
    metrics = compute_metrics(labels, probs, class_names, malignant)
    training = card["training"]
    return {
        "arm": arm,
        "seed": seed,
        "training_seed": training["seed"],
        "manifest": str(manifest_path),
        "manifest_sha256": fingerprint["manifest_sha256"],
        "test_rows_sha256": _test_rows_sha256(manifest_path),
        "run_dir": str(run_dir),
        "class_names": class_names,
        "malignant_classes": malignant,
        "train_images": training["images"],
        "train_counts": training["train_counts"],
        "synthetic_images": sum(c["synthetic"] for c in training["train_counts"].values()),
        "best_epoch": training["best_epoch"],
        "epochs_run": training["epochs_run"],
        "train_minutes": training["train_minutes"],
        "wall_minutes": json.loads(result_file.read_text())["wall_minutes"],
        "test_n": metrics["n"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "malignant_auc": metrics.get("malignant_auc"),
        "recall": {name: row["recall"] for name, row in metrics["per_class"].items()},
        "test_labels": labels,
        "test_probs": probs,
    }


# --------------------------------------------------------------------------------------------------------------------
# Paired comparison and the record


def compare_arms(reference: dict[str, Any], candidate: dict[str, Any], rare: Sequence[str], n_boot: int = 1000,
                 seed: int | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Change (candidate - reference) on the same real test rows, with paired, class-stratified bootstrap intervals
    (`pipelines.synthesis.efficacy.paired_change`): balanced accuracy, malignant AUC and each rare class's recall."""
    from pipelines.config import BOOTSTRAP_SEED

    seed = BOOTSTRAP_SEED if seed is None else seed
    if reference["test_rows_sha256"] != candidate["test_rows_sha256"] or not np.array_equal(
            reference["test_labels"], candidate["test_labels"]):
        raise ValueError(f"arms '{reference['arm']}' and '{candidate['arm']}' were scored on different test rows; "
                         "expected the same real test split")
    if reference["class_names"] != candidate["class_names"]:
        raise ValueError(f"arms have different classes {reference['class_names']} and {candidate['class_names']}")
    if n_boot < 1:
        raise ValueError(f"--bootstrap must be at least 1 resample, got {n_boot}")
    return paired_change(reference["test_labels"], reference["test_probs"], candidate["test_probs"],
                         list(reference["class_names"]), list(reference["malignant_classes"]), rare, n_boot, seed,
                         confidence)


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("test_labels", "test_probs")}


def pair_record(n_label: str, seed: int, arms: dict[str, dict[str, Any]], rare: Sequence[str], n_boot: int = 1000,
                bootstrap_seed: int | None = None) -> dict[str, Any]:
    """One N and seed: both arms' rows (without the probabilities) and the paired change."""
    if arms[REAL]["training_seed"] != arms[SYNTHETIC]["training_seed"]:
        raise ValueError(f"N={n_label}: the arms trained with seeds {arms[REAL]['training_seed']} and "
                         f"{arms[SYNTHETIC]['training_seed']}; expected one seed")
    return {"n_real": n_label, "seed": seed, "arms": {arm: _public(row) for arm, row in arms.items()},
            "change": compare_arms(arms[REAL], arms[SYNTHETIC], rare, n_boot, bootstrap_seed)}


def pooled_over_seeds(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per N: each change's mean and range over seeds, how many seeds' intervals lie above / below zero, and each
    arm's absolute test metrics and training minutes (mean and range)."""
    pooled = []
    for n_label in dict.fromkeys(p["n_real"] for p in pairs):
        group = [p for p in pairs if p["n_real"] == n_label]
        entry: dict[str, Any] = {"n_real": n_label, "seeds": [p["seed"] for p in group], "change": {}, "arms": {}}
        metrics = ["balanced_accuracy", "malignant_auc"] + [f"recall/{c}" for c in group[0]["change"]["recall"]]
        for metric in metrics:
            cells = [p["change"][metric] if "/" not in metric else p["change"]["recall"][metric.split("/", 1)[1]]
                     for p in group]
            entry["change"][metric] = {**_spread([c["delta"] for c in cells]),
                                       "intervals_above_zero": sum(c["low"] > 0 for c in cells),
                                       "intervals_below_zero": sum(c["high"] < 0 for c in cells)}
        for arm in ARMS:
            rows = [p["arms"][arm] for p in group]
            keys = ("balanced_accuracy", "malignant_auc", "train_minutes", "wall_minutes")
            block = {key: _spread([r[key] for r in rows]) for key in keys if rows[0][key] is not None}
            block["recall"] = {c: _spread([r["recall"][c] for r in rows]) for c in group[0]["change"]["recall"]}
            block["train_images"] = rows[0]["train_images"]
            block["synthetic_images"] = rows[0]["synthetic_images"]
            entry["arms"][arm] = block
        pooled.append(entry)
    return pooled


def protocol_text(meta: dict[str, Any]) -> str:
    """The protocol paragraph of the record, naming what the synthetic source is."""
    s = meta["settings"]
    epochs = f"{s['epochs']} epoch" + ("s" if s["epochs"] != 1 else "")
    text = (f"Real data: {meta['data']} ({meta['real_images']} images), one grouped (lesion-level) train/val/test "
            f"split (seed {meta['split_seed']}); N real training images drawn class-stratified from its training split "
            f"(seed {meta['subsample_seed']}), the same rows for both arms. Arm 'real only' trains on them; arm "
            f"'real + synthetic' on the same rows plus {meta['synthetic_per_class']} synthetic images for each rare "
            f"class ({', '.join(meta['rare_classes'])}), split=train, source=synthetic, drawn once per N (seed "
            f"{meta['synthetic_seed']}) from {source_name(meta['source'])}. Both arms: {s['model']} at "
            f"{s['img_size']} px ({'ImageNet-pretrained' if s['pretrained'] else 'from scratch'}), {epochs}, batch "
            f"{s['batch_size']}, lr {s['lr']}, class weighting {s['class_weighting']}, the epoch chosen on the real "
            f"validation split, temperature calibration, tta {s['tta']}; the same training seed for both arms of a "
            f"pair. Scored on the real test split only (the synthetic arm sees more images per epoch). Changes are "
            f"'real + synthetic' minus 'real only' with {100 * meta['confidence']:.0f} % paired percentile bootstrap "
            f"intervals stratified by class ({meta['bootstrap']} resamples); pooled over seeds as mean [min, max].")
    if meta["harness_check"]:
        text += f" The synthetic images here come from {source_name(meta['source'])}: {HARNESS_CHECK}."
    return text


def _delta(cell: dict[str, Any] | None) -> str:
    return f"{cell['delta']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]" if cell else ""


def _pooled(cell: dict[str, Any] | None, signed: bool = True) -> str:
    if not cell:
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(cell['mean'])} [{f.format(cell['min'])}, {f.format(cell['max'])}]"


def results_markdown(record: dict[str, Any]) -> str:
    """The record as markdown: the paired changes per seed and pooled, then each arm's absolute test metrics."""
    rare = record["rare_classes"]
    lines = [f"# Synthetic-data efficacy: {record['source_label']}", "",
             f"Measured on {record['date']}, {record['machine']}.", ""]
    if record["harness_check"]:
        lines += [f"**These rows are {HARNESS_CHECK}.**", ""]
    lines += [record["protocol"], "", f"Command: `{record['command']}`", "",
              "## Change with synthetic images (real test split)", "",
              "| N real | seed | Δ balanced acc. | Δ malignant AUC | " + " | ".join(f"Δ recall {c}" for c in rare)
              + " | train min (real / +syn) |",
              "|---|---|---|---|" + "---|" * len(rare) + "---|"]
    for pair in record["pairs"]:
        ch, arms = pair["change"], pair["arms"]
        lines.append(f"| {pair['n_real']} | {pair['seed']} | {_delta(ch['balanced_accuracy'])} | "
                     f"{_delta(ch.get('malignant_auc'))} | "
                     + " | ".join(_delta(ch["recall"].get(c)) for c in rare)
                     + f" | {arms[REAL]['train_minutes']:.2f} / {arms[SYNTHETIC]['train_minutes']:.2f} |")
    for entry in record["pooled"]:
        ch, arms = entry["change"], entry["arms"]
        lines.append(f"| {entry['n_real']} | pooled ({len(entry['seeds'])}) | {_pooled(ch['balanced_accuracy'])} | "
                     f"{_pooled(ch.get('malignant_auc'))} | "
                     + " | ".join(_pooled(ch.get(f"recall/{c}")) for c in rare)
                     + f" | {arms[REAL]['train_minutes']['mean']:.2f} / "
                       f"{arms[SYNTHETIC]['train_minutes']['mean']:.2f} |")
    lines += ["", "Δ: 'real + synthetic' minus 'real only' [95 % paired bootstrap interval]; pooled: mean [min, max] "
              "over seeds.", "", "## Each arm on the real test split (mean [min, max] over seeds)", "",
              "| N real | arm | train images | balanced acc. | malignant AUC | "
              + " | ".join(f"recall {c}" for c in rare) + " |",
              "|---|---|---|---|---|" + "---|" * len(rare)]
    for entry in record["pooled"]:
        for arm, block in entry["arms"].items():
            lines.append(f"| {entry['n_real']} | {arm} | {block['train_images']} | "
                         f"{_pooled(block['balanced_accuracy'], False)} | {_pooled(block.get('malignant_auc'), False)}"
                         " | " + " | ".join(_pooled(block["recall"].get(c), False) for c in rare) + " |")
    return "\n".join(lines) + "\n"


def summarise(pairs: list[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Pool the pairs over seeds and write `results.json` (protocol, command, date, raw rows) and `results.md`."""
    meta = {**meta, "harness_check": not meta["source"].startswith("folder:")}
    meta.setdefault("source_label", source_label(meta["source"]))
    record = {"study": "synthetic_efficacy", **meta, "protocol": protocol_text(meta),
              "rows": [{"n_real": p["n_real"], **row} for p in pairs for row in p["arms"].values()],
              "pairs": pairs, "pooled": pooled_over_seeds(pairs)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=float))
    (out_dir / "results.md").write_text(results_markdown(record))
    return record


# --------------------------------------------------------------------------------------------------------------------
# Command line


def parse_n_real(values: Sequence[str]) -> list[int | None]:
    """--n-real values: positive integers or 'all' (None), in the order given, without repeats."""
    out: list[int | None] = []
    for value in values:
        if value == "all":
            n = None
        elif value.isdigit() and int(value) > 0:
            n = int(value)
        else:
            raise ValueError(f"--n-real value '{value}' is not a positive number of images or 'all'")
        if n not in out:
            out.append(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's arguments (small CPU-friendly defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="HAM10000-layout folder (metadata.csv + images/)")
    p.add_argument("--n-real", nargs="+", default=["500", "1000", "all"], help="real training images: numbers or all")
    p.add_argument("--synthetic-per-class", type=int, default=100, help="synthetic images added per rare class")
    p.add_argument("--rare-classes", nargs="+", help="default: classes with fewer training images than the median")
    p.add_argument("--source", default="smote", help="smote, tiny-flux or folder:PATH (PATH/<class>/<image>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (both arms use each)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--subsample-seed", type=int, default=0)
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128], help="small-cnn channel widths")
    p.add_argument("--pretrained", action="store_true", help="ImageNet weights (EfficientNet-Lite models)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--class-weighting", choices=["none", "inverse", "effective"], default="none")
    p.add_argument("--tta", type=int, choices=[1, 8], default=1)
    p.add_argument("--malignant-classes", nargs="+", default=list(DEFAULT_MALIGNANT))
    p.add_argument("--smote-size", type=int, help="pixel-space SMOTE image size (default: min(img-size, 64))")
    p.add_argument("--flux-base", help="tiny-flux: FLUX diffusers folder (default: build the tiny offline pipeline)")
    p.add_argument("--flux-lora", help="tiny-flux: LoRA file for the generator")
    p.add_argument("--flux-steps", type=int, default=4, help="tiny-flux: inference steps")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--work", help="runs folder (default runs/synthetic_efficacy/<name of --out>)")
    p.add_argument("--out", help="record folder (default benchmarks/results/synthetic_efficacy/<source>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every N x seed x arm and write the record after each pair."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "folder" if args.source.startswith("folder:") else args.source
    out = Path(args.out or Path("benchmarks/results/synthetic_efficacy") / name)
    work = Path(args.work or Path("runs/synthetic_efficacy") / out.name)
    n_values = parse_n_real(args.n_real)
    settings = ArmSettings(model=args.model, img_size=args.img_size, widths=tuple(args.widths),
                           pretrained=args.pretrained, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           class_weighting=args.class_weighting, tta=args.tta,
                           malignant_classes=tuple(args.malignant_classes))
    options: dict[str, Any] = {}
    if args.source == "smote":
        options = {"size": args.smote_size or min(args.img_size, 64)}
    elif args.source == "tiny-flux":
        options = {"base": args.flux_base, "lora": args.flux_lora, "steps": args.flux_steps}
    manifest = load_real_split(args.data, split_seed=args.split_seed)
    rare = rare_classes_of(manifest, args.rare_classes)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/synthetic_efficacy.py", *argv]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "data": str(args.data), "real_images": len(manifest), "split_seed": args.split_seed,
        "split_counts": {s: int((manifest.split == s).sum()) for s in ("train", "val", "test")},
        "subsample_seed": args.subsample_seed, "synthetic_seed": args.synthetic_seed, "source": args.source,
        "synthetic_per_class": args.synthetic_per_class, "rare_classes": rare,
        "malignant_classes": list(args.malignant_classes), "seeds": args.seeds, "bootstrap": args.bootstrap,
        "confidence": 0.95, "settings": asdict(settings), "work": str(work),
    }
    log.info("rare classes: %s; work folder %s; record %s", ", ".join(rare), work, out)
    pairs = []
    for n in n_values:
        n_label = "all" if n is None else str(n)
        real = subsample_train(manifest, n, args.subsample_seed)
        n_dir = work / f"N{n_label}"
        synthetic = synthetic_rows(args.source, real, rare, args.synthetic_per_class, n_dir / "synthetic",
                                   args.synthetic_seed, **options)
        paths = build_arm_manifests(real, synthetic, n_dir)
        for seed in args.seeds:
            arms = {arm: run_arm(arm, paths[arm], n_dir / f"seed{seed}" / ARM_DIRS[arm], seed, settings,
                                 work / "image_cache") for arm in ARMS}
            pair = pair_record(n_label, seed, arms, rare, args.bootstrap)
            pairs.append(pair)
            ch = pair["change"]
            log.info("N=%s seed %d: Δ balanced accuracy %s, Δ malignant AUC %s", n_label, seed,
                     _delta(ch["balanced_accuracy"]), _delta(ch.get("malignant_auc")))
            summarise(pairs, meta, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
