"""Copy a trained HAM10000 bundle to where lesionlab ships it, with the data licence and intended use on its card.

    python benchmarks/ship_bundle.py runs/bench_default/bundle models/default_bundle

The card gains `data_license`, `intended_use` and `model_version` (the date); an `ATTRIBUTION.md` with the model's
provenance (the training command, from the run's `benchmark.json`) and the data's attribution is written beside the
weights. Nothing else changes: the weights, calibration, threshold
and metrics are the trained bundle's own. The destination is replaced only once the copy is complete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
from pathlib import Path

DATA_LICENSE = ("Trained on HAM10000 (Tschandl et al., Sci. Data 5, 180161, 2018; ViDIR Group, Medical University "
                "of Vienna), CC BY-NC 4.0: non-commercial research use only. See data/ATTRIBUTION.md.")
INTENDED_USE = "Research use only; not a diagnostic device."


ATTRIBUTION = """# Default bundle: provenance and licence

Model version {version}: {architecture} (ImageNet initialisation from Google's EfficientNet-Lite checkpoint,
Apache-2.0) fine-tuned at {size} px on the training split of the 5,984-image HAM10000 subset (one image per lesion,
grouped 70/15/15 split by lesion, seed 0) by

    {command}

Training data: Tschandl P., Rosendahl C., Kittler H. "The HAM10000 dataset, a large collection of multi-source
dermatoscopic images of common pigmented skin lesions." Sci. Data 5, 180161 (2018). ViDIR Group, Medical University
of Vienna. **License: CC BY-NC 4.0** — this model is for non-commercial research use only.
Research use only; not a diagnostic device.
"""


def ship(source: Path, dest: Path, version: str) -> Path:
    """Write the shipped copy of `source` at `dest`."""
    from models.bundle import load_bundle

    load_bundle(source)  # refuse a bundle that does not load
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("evaluation", ".*"))
    card = json.loads((staging / "card.json").read_text())
    card.update(data_license=DATA_LICENSE, intended_use=INTENDED_USE, model_version=version)
    (staging / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    record = source.parent / "benchmark.json"
    command = json.loads(record.read_text())["command"] if record.is_file() else "(not recorded)"
    (staging / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(
        architecture=card["architecture"]["name"], size=card["input_size"], version=version, command=command))
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a trained bundle folder")
    parser.add_argument("dest", type=Path, help="where to ship it (e.g. models/default_bundle)")
    parser.add_argument("--version", default=datetime.date.today().isoformat(), help="model version (default: today)")
    args = parser.parse_args()
    print(f"shipped {args.source} as {ship(args.source, args.dest, args.version)}")


if __name__ == "__main__":
    main()
