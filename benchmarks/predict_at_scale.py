"""`lesionlab predict` on 100,000 images: memory over the run, throughput, and a resume after a kill.

    .venv/bin/python benchmarks/predict_at_scale.py --images ../shared/data/ham10000/images --count 100000 \
        --work runs/predict_scale --kill-at 20000 --tta 1

Builds a folder of `--count` symbolic links that cycle through the source images (file names are unique, so every
link is one row), runs the CLI on it in a subprocess while sampling its resident memory (VmRSS) every second, kills
it (SIGKILL) once `--kill-at` rows are in the CSV, runs it again with `--resume`, and writes the samples and a
summary to `--record` (default benchmarks/results/predict_scale/scale.json). The network runs as `lesionlab
predict` runs it by default (the bundle's ONNX export); `--tta` sets the views (the shipped recipe is 8).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".jpg", ".jpeg", ".png"}


def build_folder(source: Path, folder: Path, count: int) -> int:
    """`count` links named img_0000000.<ext> cycling through the source images (kept when already there)."""
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES)
    if not images:
        raise SystemExit(f"'{source}' holds no .jpg/.png images")
    folder.mkdir(parents=True, exist_ok=True)
    made = 0
    for i in range(count):
        target = images[i % len(images)].resolve()
        link = folder / f"img_{i:07d}{target.suffix.lower()}"
        if not link.is_symlink():
            link.symlink_to(target)
            made += 1
    return len(images)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rows_in(csv: Path) -> int:
    """Data rows in a CSV (lines minus the header)."""
    return RowCounter(csv)()


class RowCounter:
    """Data rows in a growing CSV, reading only what was appended since the last call."""

    def __init__(self, csv: Path) -> None:
        self.csv, self.offset, self.lines = csv, 0, 0

    def __call__(self) -> int:
        if not self.csv.is_file():
            return 0
        if self.csv.stat().st_size < self.offset:  # rewritten or truncated (a resume drops a cut-off last row)
            self.offset, self.lines = 0, 0
        with open(self.csv, "rb") as handle:
            handle.seek(self.offset)
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                self.lines += chunk.count(b"\n")
                self.offset += len(chunk)
        return max(0, self.lines - 1)


def run_phase(name: str, command: list[str], csv: Path, kill_at: int | None, every: float) -> dict:
    """Run the command, sampling (seconds, RSS MiB, rows) every `every` s; SIGKILL it at `kill_at` rows."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples, killed, count = [], False, RowCounter(csv)
    while process.poll() is None:
        time.sleep(every)
        rows, memory = count(), rss_mb(process.pid)
        if memory is not None:
            samples.append([round(time.perf_counter() - started, 1), round(memory, 1), rows])
        if kill_at is not None and rows >= kill_at:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
    out, err = process.communicate()
    return {"phase": name, "command": " ".join(command), "returncode": process.returncode, "killed": killed,
            "seconds": round(time.perf_counter() - started, 1), "rows_after": rows_in(csv), "samples": samples,
            "stdout_tail": out[-2000:], "stderr_tail": err[-2000:]}


def summarise(phase: dict, total: int) -> dict:
    """Peak memory, memory at 10 % / 50 % / 90 % of the rows this phase wrote, and its rows per second."""
    samples = [s for s in phase["samples"] if s[2] > 0]
    if not samples:
        return {"peak_rss_mb": None}
    first, last = samples[0][2], samples[-1][2]

    def rss_at(fraction: float) -> float:
        goal = first + fraction * (last - first)
        return next(s[1] for s in samples if s[2] >= goal)

    moving = (samples[-1][2] - samples[0][2]) / max(samples[-1][0] - samples[0][0], 1e-9)
    return {"peak_rss_mb": max(s[1] for s in phase["samples"]), "rss_mb_at_10_50_90_percent":
            [rss_at(0.1), rss_at(0.5), rss_at(0.9)], "rows_per_s": round(moving, 1), "rows_total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of source images (e.g. ../shared/data/ham10000/images)")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--work", default="runs/predict_scale")
    parser.add_argument("--kill-at", type=int, default=20_000, help="SIGKILL the first run at this many rows")
    parser.add_argument("--tta", type=int, choices=[1, 8], default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--every", type=float, default=1.0, help="sampling interval in seconds")
    parser.add_argument("--record", default=str(ROOT / "benchmarks" / "results" / "predict_scale" / "scale.json"))
    args = parser.parse_args()

    work = Path(args.work)
    sources = build_folder(Path(args.images), work / "images", args.count)
    csv = work / "predictions.csv"
    csv.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pipelines.cli", "predict", "--images", str(work / "images"), "--out", str(csv),
               "--tta", str(args.tta), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--no-progress"]
    first = run_phase("first run, killed", command, csv, args.kill_at, args.every)
    second = run_phase("resumed", [*command, "--resume"], csv, None, args.every)
    rows = rows_in(csv)
    import pandas as pd

    ids = pd.read_csv(csv, usecols=["image_id"]).image_id
    record = {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "images": args.count,
        "source_images": sources, "tta": args.tta, "cpu_count": os.cpu_count(),
        "rows_in_csv": rows, "unique_ids": int(ids.nunique()), "duplicated_ids": int(ids.duplicated().sum()),
        "phases": [first, second], "summary": [summarise(first, rows), summarise(second, rows)],
    }
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("rows_in_csv", "unique_ids", "duplicated_ids", "summary")}, indent=1))


if __name__ == "__main__":
    main()
