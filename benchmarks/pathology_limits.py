"""Peak memory and time of the Pathology tab's analysis for the worst input the server accepts, and the H&E check.

    nice -n 19 .venv/bin/python benchmarks/pathology_limits.py --ucsb ../shared/data/ucsb_breast \
        --ham ../shared/data/ham10000 --out benchmarks/results/pathology_limits

Limits: an H&E image exactly at the server's default pixel limit (`ServeSettings().limits()`: 50 MP, 25 MB) is made
by tiling a real UCSB image and saved as JPEG (quality 90); `app.pathology.analyze_slide` runs on it with the shipped
bundle, each setting in a fresh process (peak RSS from getrusage, baseline RSS after the imports and the bundle load).
Settings: the tab's patch cap (MAX_CASE_PATCHES), no cap (every tissue patch), and one ordinary 896 x 768 image.

H&E check: `blue_excess` of the analysed patches (128 px, min_tissue 0.25, as the bundle tiles) on every UCSB image
and on every `--ham-step`-th HAM10000 image; how many fall under MIN_BLUE_EXCESS or give fewer than MIN_CASE_PATCHES
patches (the two warning rules).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUNDLE = ROOT / "models" / "pathology_bundle"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(image: Path, cap: int | None) -> dict:
    """Run one analysis in this process and report time and memory (called in a fresh child process)."""
    import torch

    torch.set_num_threads(2)
    from app.pathology import analyze_slide
    from app.settings import ServeSettings
    from models.bundle import load_bundle

    bundle = load_bundle(BUNDLE)
    baseline = _rss_mb()
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = analyze_slide(bundle, [image], limits=ServeSettings().limits(), max_patches=cap or 10**9)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "image": image.name,
        "megapixels": round(Image.open(image).width * Image.open(image).height / 1e6, 3),
        "file_mb": round(image.stat().st_size / 2**20, 2),
        "patch_cap": cap,
        "n_patches": result.n_patches,
        "n_tissue_patches": result.n_tissue_patches,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(cpu1.ru_maxrss / 1024, 1),
        "p_malignant": result.prob_malignant,
        "warnings": len(result.warnings),
    }


def worst_image(source: Path, out: Path, max_pixels: int) -> Path:
    """A real H&E image tiled up to the pixel limit (width 8192, the largest height within it), as JPEG q90."""
    rgb = np.asarray(Image.open(source).convert("RGB"))
    width = 8192
    height = max_pixels // width
    reps = (-(-height // rgb.shape[0]), -(-width // rgb.shape[1]), 1)
    canvas = np.tile(rgb, reps)[:height, :width]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out, quality=90)
    return out


def colour_check(ucsb: Path, ham: Path | None, ham_step: int) -> dict:
    """blue_excess and patch counts over the UCSB images and a regular subset of HAM10000."""
    from app.pathology import MIN_BLUE_EXCESS, MIN_CASE_PATCHES, blue_excess
    from models.bundle import read_card
    from pipelines.bags import tile_image
    from pipelines.config import TilingSettings

    settings = TilingSettings.model_validate(read_card(BUNDLE)["tiling"])

    def rows(paths: list[Path], dataset: str) -> list[dict]:
        out = []
        for path in paths:
            try:
                bag = tile_image(Image.open(path).convert("RGB"), settings)
            except ValueError:
                out.append({"dataset": dataset, "image": path.name, "n_patches": 0, "blue_excess": None})
                continue
            out.append({"dataset": dataset, "image": path.name, "n_patches": len(bag),
                        "blue_excess": round(blue_excess(bag.patches), 4)})
        return out

    table = rows(sorted((ucsb / "images").glob("*.jpg")), "ucsb_breast")
    if ham is not None:
        table += rows(sorted((ham / "images").glob("*.jpg"))[::ham_step], "ham10000")
    summary = {}
    for dataset in sorted({r["dataset"] for r in table}):
        part = [r for r in table if r["dataset"] == dataset]
        scores = np.asarray([r["blue_excess"] for r in part if r["blue_excess"] is not None])
        summary[dataset] = {
            "images": len(part),
            "no_tissue_patch": sum(r["blue_excess"] is None for r in part),
            "blue_excess_min_median_max": [round(float(np.min(scores)), 4), round(float(np.median(scores)), 4),
                                           round(float(np.max(scores)), 4)],
            "colour_warning": int((scores < MIN_BLUE_EXCESS).sum()),
            "few_patches_warning": sum(0 < r["n_patches"] < MIN_CASE_PATCHES for r in part),
            "either_warning_or_refused": sum(r["blue_excess"] is None or r["blue_excess"] < MIN_BLUE_EXCESS
                                             or r["n_patches"] < MIN_CASE_PATCHES for r in part),
        }
    return {"min_blue_excess": MIN_BLUE_EXCESS, "min_case_patches": MIN_CASE_PATCHES, "summary": summary,
            "rows": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ucsb", type=Path, required=True, help="UCSB breast folder (images/)")
    parser.add_argument("--ham", type=Path, help="HAM10000 folder (images/) for the H&E check")
    parser.add_argument("--ham-step", type=int, default=5, help="every n-th HAM10000 image")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pathology_limits")
    parser.add_argument("--work", type=Path, default=Path("runs/pathology_limits"), help="where the test image goes")
    parser.add_argument("--one", nargs=2, metavar=("IMAGE", "CAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, JSON on stdout
        cap = None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(measure_one(Path(args.one[0]), cap)))
        return

    from app.pathology import MAX_CASE_PATCHES
    from app.settings import ServeSettings

    limits = ServeSettings().limits()
    source = sorted((args.ucsb / "images").glob("*malignant*.jpg"))[0]
    big = worst_image(source, args.work / "worst_case_50mp.jpg", limits.max_pixels)
    if big.stat().st_size > limits.max_bytes:
        raise SystemExit(f"the test image is {big.stat().st_size / 2**20:.1f} MB, over the {limits.max_bytes} limit")
    runs = []
    for image, cap in ((source, MAX_CASE_PATCHES), (big, MAX_CASE_PATCHES), (big, None)):
        command = [sys.executable, __file__, "--ucsb", str(args.ucsb), "--one", str(image), str(cap or "none")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        runs.append(row)
    checked = colour_check(args.ucsb, args.ham, args.ham_step)
    print(json.dumps(checked["summary"], indent=2))
    record = {
        "date": datetime.date.today().isoformat(),
        "command": "nice -n 19 .venv/bin/python benchmarks/pathology_limits.py --ucsb ../shared/data/ucsb_breast "
                   f"--ham ../shared/data/ham10000 --ham-step {args.ham_step}",
        "limits": {"max_file_mb": limits.max_bytes / 2**20, "max_megapixels": limits.max_pixels / 1e6},
        "max_case_patches": MAX_CASE_PATCHES,
        "runs": runs,
        "colour_check": checked,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "limits.json").write_text(json.dumps(record, indent=2))
    print(f"written to {args.out / 'limits.json'}")


if __name__ == "__main__":
    main()
