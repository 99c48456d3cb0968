"""Single-image CPU latency of the Predictor (batch 1): p50 over N runs, at the bundle's input size.

    .venv/bin/python benchmarks/predictor_latency.py ../shared/data/ham10000 [--bundle models/default_bundle]

Without a bundle (or when models/default_bundle does not exist yet) an untrained EfficientNet-Lite0 at --size px is
timed: same network, same preprocessing, so the same cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.bundle import load_bundle, save_bundle
from models.registry import build_model, default_normalization
from pipelines.prediction import Predictor

log = logging.getLogger("predictor_latency")
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "default_bundle"


def _stand_in_bundle(folder: Path, architecture: str, size: int) -> Path:
    model = build_model(architecture, num_classes=7, img_size=size).eval()
    card = {"architecture": {"name": architecture, "kwargs": {}}, "class_names": [f"c{i}" for i in range(7)],
            "input_size": size, "normalization": default_normalization(architecture), "malignant_classes": ["c0"]}
    return save_bundle(folder, model, card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset folder with an images/ sub-folder (e.g. ../shared/data/ham10000)")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--architecture", default="efficientnet-lite0", help="stand-in when no bundle exists")
    parser.add_argument("--size", type=int, default=224, help="stand-in input size")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--tta", type=int, choices=[1, 8], help="views (default: the bundle's own setting)")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle_dir = Path(args.bundle)
    stand_in = not (bundle_dir / "card.json").is_file()
    if stand_in:
        bundle_dir = _stand_in_bundle(Path(tempfile.mkdtemp()) / "bundle", args.architecture, args.size)
        log.info("no bundle at %s: timing an untrained %s at %d px", args.bundle, args.architecture, args.size)
    predictor = Predictor(load_bundle(bundle_dir), tta=args.tta)
    files = sorted((Path(args.data) / "images").glob("*.jpg"))[: args.runs + args.warmup]
    if not files:
        raise SystemExit(f"no .jpg images under {Path(args.data) / 'images'}")
    images = [Image.open(f).convert("RGB") for f in files]
    timings = []
    for i in range(args.warmup + args.runs):
        image = images[i % len(images)]
        start = time.perf_counter()
        predictor.predict([image])  # preprocessing (resize, crop, normalise) + forward + softmax, batch 1
        if i >= args.warmup:
            timings.append(1000 * (time.perf_counter() - start))
    result = {
        "bundle": "stand-in " + args.architecture if stand_in else str(args.bundle),
        "input_size": predictor.bundle.input_size,
        "tta": predictor.tta,
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "p50_ms": round(statistics.median(timings), 2),
        "p90_ms": round(float(np.percentile(timings, 90)), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
        "min_ms": round(min(timings), 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
