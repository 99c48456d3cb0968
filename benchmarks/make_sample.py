"""Build the embedded real sample in data/ from the full HAM10000 and UCSB folders (run once by a maintainer)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

# Per-class quota: nevi dominate as in the full set, yet every rare class keeps enough images to test on.
HAM_QUOTA = {"nv": 520, "bkl": 110, "mel": 110, "bcc": 80, "akiec": 70, "vasc": 55, "df": 55}
UCSB_SAMPLE = 6


def make_ham_sample(src: Path, dst: Path, size: int, seed: int) -> None:
    meta = pd.read_csv(src / "metadata.csv")
    parts = [meta[meta.dx == dx].sample(n=n, random_state=seed) for dx, n in HAM_QUOTA.items()]
    sample = pd.concat(parts).sort_values("image_id").reset_index(drop=True)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for image_id in sample.image_id:
        with Image.open(src / "images" / f"{image_id}.jpg") as im:
            im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(
                dst / "images" / f"{image_id}.jpg", quality=90
            )
    sample.to_csv(dst / "metadata.csv", index=False)


def make_ucsb_sample(src: Path, dst: Path, seed: int) -> None:
    labels = pd.read_csv(src / "labels.csv")
    half = UCSB_SAMPLE // 2
    sample = pd.concat(
        [
            labels[labels.label == "benign"].sample(n=half, random_state=seed),
            labels[labels.label == "malignant"].sample(n=half, random_state=seed),
        ]
    ).sort_values("image")
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for name in sample.image:
        shutil.copy(src / "images" / name, dst / "images" / name)
    sample.to_csv(dst / "labels.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ham10000", type=Path, required=True)
    parser.add_argument("--ucsb", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_ham_sample(args.ham10000, args.out / "ham10000_sample", args.size, args.seed)
    make_ucsb_sample(args.ucsb, args.out / "ucsb_breast_sample", args.seed)


if __name__ == "__main__":
    main()
