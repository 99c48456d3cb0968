"""Train the shipped pathology bundle (SC-MIL on UCSB breast H&E) and copy it to models/pathology_bundle.

    nice -n 19 .venv/bin/python benchmarks/ship_mil_bundle.py --data ../shared/data/ucsb_breast --out runs/mil_ship

Training is `lesionlab mil-train --config configs/mil.yaml` with the documented full-data overrides (grouped
60/20/20 split by TMA batch, seed 0, 60 epochs; every setting fixed before the run). The copy step stores the
weights in float16 (the frozen ImageNet encoder dominates the size), then re-scores the *shipped* weights: the
operating threshold is chosen again on the validation slides (target sensitivity from the config) and the
validation and test metrics on the card are those of the shipped weights. The card gains a clinical description,
the data source and licence (from the data set's ATTRIBUTION.md, which is copied beside the weights), the slide
counts, limitations and the model version; it holds no file paths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mil.yaml"

DESCRIPTION = (
    "Attention multiple-instance (SC-MIL) classifier for H&E-stained breast tissue: one image (a tissue-microarray "
    "core) is cut into 128 px tissue patches, a frozen ImageNet EfficientNet-Lite0 describes each patch, and a "
    "gated-attention head weighs them into one benign-vs-malignant prediction for the case."
)
DATA_SOURCE = (
    "UCSB Bio-Segmentation benchmark, breast cancer cell images: 58 H&E breast tissue-microarray images "
    "(896 x 768 px; 32 benign, 26 malignant; 10 TMA batches). Gelasca E.D., Byun J., Obara B., Manjunath B.S. "
    "\"Evaluation and benchmark for biological image segmentation.\" ICIP 2008."
)
DATA_LICENSE = (
    "Offered by UCSB for research use; cite the source (Gelasca et al., ICIP 2008) when you use it. This model is "
    "for non-commercial research use only."
)
INTENDED_USE = "Research use only; not a diagnostic device."
LIMITATIONS = [
    "Trained on {n_train} images from one source (UCSB breast TMA cores at one magnification); not validated on "
    "other organs, other scanners or stains, frozen sections, cytology or whole-slide images.",
    "Validated on few cases (the numbers on this card come with their n): treat them as a check that the model "
    "works, not as a precise accuracy.",
    "Probabilities are not calibrated (too few validation slides for temperature scaling): read them as scores.",
    "It knows only benign and malignant breast tissue: any other tissue or image is still given one of the two.",
    "Research use only; not a diagnostic device.",
]


def train(data: Path, out: Path, epochs: int) -> tuple[dict, list[str]]:
    """Run the MIL stage exactly as `lesionlab mil-train` would, with the full-data overrides."""
    from pipelines.config import dump_config, load_config
    from pipelines.mil import run_mil_stage

    overrides = [
        f"run_dir={out}",
        f"mil.data.root={data}",
        "split.val_fraction=0.2",
        "split.test_fraction=0.2",
        f"training.epochs={epochs}",
        "training.device=cpu",
        f"mil.cache_dir={out / 'cache'}",
    ]
    config = load_config(CONFIG, overrides)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    return run_mil_stage(config, out, None), overrides


def _score(bundle, slides: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(labels, probabilities, raw rows) of a bundle over slide rows."""
    from pipelines.mil import predict_slides

    table = predict_slides(bundle, list(slides.path))
    index = {c: i for i, c in enumerate(bundle.class_names)}
    labels = slides.label.map(index).to_numpy()
    probs = table[[f"prob_{c}" for c in bundle.class_names]].to_numpy()
    rows = [{"image": Path(p).name, "split": s, "label": lab, "p_malignant": float(pm), "n_patches": int(n)}
            for p, s, lab, pm, n in zip(slides.path, slides.split, slides.label, table.prob_malignant,
                                        table.n_patches)]
    return labels, probs, rows


def _source_paragraph(attribution: Path) -> str:
    """The data set's own attribution: the paragraph of its ATTRIBUTION.md that starts with "Source:"."""
    paragraphs = [" ".join(p.split()) for p in attribution.read_text().split("\n\n")]
    found = [p for p in paragraphs if p.startswith("Source:")]
    if not found:
        raise ValueError(f"'{attribution.name}' has no 'Source:' paragraph to carry on the card")
    return found[0]


def ship(run_dir: Path, data: Path, dest: Path, version: str, target_sensitivity: float) -> dict:
    """Write the shipped copy of `run_dir/bundle` at `dest` (float16 weights, re-scored, clinical card)."""
    from safetensors.torch import load_file, save_file

    from models.bundle import load_bundle
    from pipelines.evaluation import card_metrics, compute_metrics, referral_threshold

    source = run_dir / "bundle"
    trained = load_bundle(source)
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = load_file(source / "weights.safetensors")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(staging / "weights.safetensors"), metadata={"format": "pt"})
    card = json.loads((source / "card.json").read_text())
    (staging / "card.json").write_text(json.dumps(card))
    shipped = load_bundle(staging)

    slides = pd.read_csv(run_dir / "mil" / "slides.csv", dtype=str, keep_default_na=False)
    val, test = slides[slides.split == "val"], slides[slides.split == "test"]
    names, malignant = shipped.class_names, shipped.malignant_classes
    val_y, val_p, val_rows = _score(shipped, val)
    threshold = referral_threshold(val_y, val_p, names, malignant, target_sensitivity)
    t = threshold["threshold"] if threshold else None
    test_y, test_p, test_rows = _score(shipped, test)
    _, trained_p, _ = _score(trained, test)

    counts = slides.groupby(["split", "label"]).size().unstack(fill_value=0)
    card.update(
        description=DESCRIPTION,
        data_source=DATA_SOURCE,
        data_license=DATA_LICENSE,
        intended_use=INTENDED_USE,
        data_attribution=_source_paragraph(data / "ATTRIBUTION.md"),
        limitations=[item.format(n_train=int((slides.split == "train").sum())) for item in LIMITATIONS],
        model_version=version,
        date=version,
        weights_dtype="float16",
        operating_threshold=t,
        threshold_metrics=threshold,
        metrics={"validation": card_metrics(compute_metrics(val_y, val_p, names, malignant, t)),
                 "test": card_metrics(compute_metrics(test_y, test_p, names, malignant, t))},
        data_counts={
            "images": int(len(slides)),
            "tma_batches": int(slides.group.nunique()),
            **{split: {c: int(counts.loc[split, c]) for c in counts.columns} for split in ("train", "val", "test")},
        },
    )
    bags = pd.read_csv(run_dir / "mil" / "bags.csv", dtype={"slide_id": str, "split": str}, keep_default_na=False)
    per_slide = bags[bags.split == "train"].groupby("slide_id").size()
    card["training"].update(data="UCSB breast H&E (58 images)",
                            patches_per_slide=[int(per_slide.min()), int(per_slide.max())])
    (staging / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    attribution = (data / "ATTRIBUTION.md").read_text()
    (staging / "ATTRIBUTION.md").write_text(
        f"# Pathology bundle: provenance and licence\n\nModel version {version}. {DESCRIPTION}\n\n"
        "Trained by `benchmarks/ship_mil_bundle.py` (the MIL stage of `lesionlab mil-train` with configs/mil.yaml "
        "and the full-data overrides; weights stored in float16). Research use only; not a diagnostic device.\n\n"
        f"## Training data\n\n{attribution.strip()}\n"
    )
    load_bundle(staging)  # refuse a bundle that does not load
    for file in staging.iterdir():
        file.chmod(0o644)  # readable by the container's unprivileged user
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return {
        "card": card,
        "rows": val_rows + test_rows,
        "max_abs_diff_float16_vs_float32_test": float(np.abs(test_p - trained_p).max()),
        "bundle_bytes": {p.name: p.stat().st_size for p in sorted(dest.iterdir())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="UCSB breast folder (labels.csv, images/)")
    parser.add_argument("--out", type=Path, default=Path("runs/mil_ship"), help="run directory")
    parser.add_argument("--dest", type=Path, default=ROOT / "models" / "pathology_bundle")
    parser.add_argument("--record", type=Path, default=ROOT / "benchmarks" / "results" / "pathology_bundle")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--version", default=datetime.date.today().isoformat(), help="model version (default: today)")
    parser.add_argument("--reuse", action="store_true", help="ship an existing run's bundle without training again")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)

    started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    previous = args.record / "ship.json"
    reuse = args.reuse and (args.out / "bundle" / "card.json").is_file()
    overrides: list[str] = []
    if not reuse:
        _, overrides = train(args.data, args.out, args.epochs)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    train_s = time.perf_counter() - started
    train_cpu_s = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    from pipelines.config import load_config

    target = load_config(args.out / "config.yaml").training.target_sensitivity
    shipped = ship(args.out, args.data, args.dest, args.version, target)
    total_s = time.perf_counter() - started
    card = shipped["card"]
    record = {
        "command": "nice -n 19 .venv/bin/python benchmarks/ship_mil_bundle.py --data ../shared/data/ucsb_breast "
                   f"--out runs/mil_ship --version {args.version}",
        "equivalent_cli": "lesionlab mil-train --config configs/mil.yaml " + " ".join(
            o for o in overrides if not o.startswith(("run_dir=", "mil.data.root=", "mil.cache_dir="))),
        "date": args.version,
        "train_wall_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "ship_wall_s": round(total_s - train_s, 1),
        "data_counts": card["data_counts"],
        "training": card["training"],
        "operating_threshold": card["operating_threshold"],
        "threshold_metrics": card["threshold_metrics"],
        "metrics": card["metrics"],
        "max_abs_diff_float16_vs_float32_test": shipped["max_abs_diff_float16_vs_float32_test"],
        "bundle_bytes": shipped["bundle_bytes"],
        "rows": shipped["rows"],
    }
    if reuse and previous.is_file():  # the training happened in an earlier call: keep its command and timings
        earlier = json.loads(previous.read_text())
        record.update({k: earlier[k] for k in ("equivalent_cli", "train_wall_s", "train_cpu_s") if k in earlier})
    args.record.mkdir(parents=True, exist_ok=True)
    (args.record / "ship.json").write_text(json.dumps(record, indent=2))
    test = card["metrics"]["test"]
    print(f"shipped {args.dest} ({sum(shipped['bundle_bytes'].values()) / 2**20:.1f} MB); training "
          f"{record['train_wall_s']:.0f} s; "
          f"test n={test['n']}: accuracy {test['accuracy']:.3f}, AUC {test.get('malignant_auc', float('nan')):.3f}; "
          f"record {args.record / 'ship.json'}")


if __name__ == "__main__":
    main()
