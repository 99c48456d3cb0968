"""CPU training throughput, side by side in one run: what each change to the input pipeline and the kernels buys.

    python benchmarks/train_throughput.py ../shared/data/ham10000 --out benchmarks/results/train_throughput

Each arm trains EfficientNet-Lite0 (ImageNet weights) for --steps optimiser steps at --size px, batch --batch-size,
on the same images in the same order, after --warmup steps; arms are cumulative in the order listed:
  decode      JPEG decode + resize + augmentation every step (the previous recipe's input path)
  cache       decoded, resized uint8 crops read from the memory-mapped image cache
  channels    + channels-last memory layout
  workers     + one DataLoader worker (augmentation overlaps the forward/backward)
  bf16        + bfloat16 autocast (CPU with avx512_bf16)
Inference (no gradients) of the same network, contiguous against channels-last, at batches 8 and 256.
Then a numerics check: --check-steps steps of float32 and of bfloat16 from the same start and the same batches; the
record holds both loss curves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.registry import build_model, default_normalization
from pipelines.data import ImageDataset
from pipelines.manifest import ingest_ham10000
from pipelines.training import build_loss
from pipelines.transforms import train_transform

log = logging.getLogger("train_throughput")
ARMS = ("decode", "cache", "channels", "workers", "bf16")


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")))


def _loader(rows, class_names, size, cache_dir, workers, batch_size, seed):
    norm = default_normalization("efficientnet-lite0")
    dataset = ImageDataset(rows, class_names, train_transform(size, **norm), seed=seed, cache_dir=cache_dir)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator,
                      drop_last=True, persistent_workers=workers > 0)


def _train_steps(loader, steps: int, warmup: int, channels_last: bool, bf16: bool, seed: int,
                 num_classes: int, size: int, counts: list[int]) -> tuple[float, list[float]]:
    """(images/s over the timed steps, loss of every step)."""
    torch.manual_seed(seed)
    model = build_model("efficientnet-lite0", num_classes, size, pretrained=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = build_loss("ce", counts, "effective")
    model.train()
    losses, seen, started = [], 0, None
    iterator = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, labels = next(iterator)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= warmup:
            seen += len(labels)
    return seen / (time.perf_counter() - started), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="HAM10000 folder: metadata.csv + images/")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="training images drawn from the folder")
    parser.add_argument("--check-steps", type=int, default=15)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/throughput_cache"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    manifest = ingest_ham10000(args.data).sample(n=args.images, random_state=args.seed).reset_index(drop=True)
    class_names = sorted(manifest.label.unique())
    counts = [int((manifest.label == c).sum()) for c in class_names]
    started = time.perf_counter()
    ImageDataset(manifest, class_names, train_transform(args.size, **default_normalization("efficientnet-lite0")),
                 cache_dir=args.cache_dir)
    cache_build_s = time.perf_counter() - started

    rows = []
    settings = {"decode": (None, 0, False, False), "cache": (args.cache_dir, 0, False, False),
                "channels": (args.cache_dir, 0, True, False), "workers": (args.cache_dir, 1, True, False),
                "bf16": (args.cache_dir, 1, True, True)}
    for arm in ARMS:
        cache, workers, channels_last, bf16 = settings[arm]
        loader = _loader(manifest, class_names, args.size, cache, workers, args.batch_size, args.seed)
        speed, losses = _train_steps(loader, args.steps, args.warmup, channels_last, bf16, args.seed,
                                     len(class_names), args.size, counts)
        rows.append({"arm": arm, "cache": cache is not None, "workers": workers, "channels_last": channels_last,
                     "bf16": bf16, "images_per_s": speed})
        log.info("%-9s %.2f images/s", arm, speed)
        del loader

    inference = []
    model = build_model("efficientnet-lite0", len(class_names), args.size, pretrained=True).eval()
    for batch in (8, 256):
        for channels_last in (False, True):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=layout)
            x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=layout)
            with torch.inference_mode():
                model(x)
                started, seen = time.perf_counter(), 0
                while time.perf_counter() - started < 5.0:
                    model(x)
                    seen += batch
            inference.append({"batch": batch, "channels_last": channels_last,
                              "images_per_s": seen / (time.perf_counter() - started)})
            log.info("inference batch %d channels_last %s: %.1f images/s", batch, channels_last,
                     inference[-1]["images_per_s"])

    # Numerics: float32 against bfloat16 autocast on identical batches from the same initial weights.
    curves = {}
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        loader = _loader(manifest, class_names, args.size, args.cache_dir, 0, args.batch_size, args.seed)
        _, curves[name] = _train_steps(loader, args.check_steps, 0, True, bf16, args.seed, len(class_names),
                                       args.size, counts)
    gap = np.abs(np.asarray(curves["float32"]) - np.asarray(curves["bfloat16"]))
    first = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_decode"] = row["images_per_s"] / first
    record = {
        "study": "train_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "cpu_flags": _cpu_flags(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "protocol": f"EfficientNet-Lite0 training steps at {args.size} px, batch {args.batch_size}, {args.images} "
                    f"HAM10000 images; {args.warmup} warm-up steps, then {args.steps} timed steps per arm; arms "
                    "cumulative, one after another in one process on an otherwise idle machine",
        "command": "python benchmarks/train_throughput.py " + " ".join(
            [str(args.data)] + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "data"]),
        "cache_build_s": cache_build_s,
        "rows": rows,
        "inference": inference,
        "loss_check": {"steps": args.check_steps, "float32": curves["float32"], "bfloat16": curves["bfloat16"],
                       "max_abs_gap": float(gap.max()), "mean_abs_gap": float(gap.mean())},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(record, indent=2))
    lines = ["| arm | images/s | × decode |", "|---|---|---|"]
    lines += [f"| {r['arm']} | {r['images_per_s']:.2f} | {r['speedup_vs_decode']:.2f} |" for r in rows]
    lines += ["", "| inference batch | channels-last | images/s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['channels_last']} | {r['images_per_s']:.1f} |" for r in inference]
    lines.append(f"\nfloat32 vs bfloat16 loss over {args.check_steps} steps: max gap {gap.max():.4f}, "
                 f"mean {gap.mean():.4f}")
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
