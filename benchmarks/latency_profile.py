"""Where the batch-1 CPU time of saved prune-benchmark EfficientNets goes: per stage, and with wider channel rounding.

    .venv/bin/python benchmarks/latency_profile.py runs/prune_bench_kd efficientnet-b0_none_0 \
        efficientnet-b0_beta-rank-inverse_50 --json benchmarks/results/pruning/latency_profile.json
    .venv/bin/python benchmarks/latency_profile.py runs/prune_bench_long efficientnet-b0_beta-rank-inverse_70 \
        --round-to 16

Rows are the `models/<row>.plan.json` + `.safetensors` pairs `prune_benchmark.py` saves. Every model is timed at
224 px, batch 1, after one batch-32 forward pass (the "warm" condition of `prune_benchmark.py --serving`), in
rounds that cycle through the models so that slow spells of the machine hit them all alike. Forward hooks stamp
the time at the boundaries of MONAI's seven MBConv stages, so the stage times add up to the whole forward pass.

`--round-to N` adds, for every row, its channel plan with every width rounded up to a multiple of N (random
weights: latency does not depend on the values), to see whether wider SIMD blocks buy speed at the network level.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_benchmark import load_row_model, row_model_stem, saved_rows  # noqa: E402

from models import build_model  # noqa: E402
from models.pruned import apply_channel_plan  # noqa: E402
from pipelines.pruning import count_flops  # noqa: E402

SQUEEZE_LAYERS = ("_se_reduce", "_se_expand")  # 1x1-pixel bottlenecks: their width is not a kernel block


def round_plan(plan: dict, multiple: int) -> dict:
    """`plan` with every conv / batch-norm / linear width above `multiple` rounded up to a multiple of it.

    The squeeze-excitation bottleneck (the output of `_se_reduce`, the input of `_se_expand`) keeps its width.
    """
    def up(width: int) -> int:
        return width if width <= multiple else math.ceil(width / multiple) * multiple

    modules = {}
    for name, spec in plan["modules"].items():
        spec = dict(spec)
        if spec["type"] == "conv":
            if not name.endswith(SQUEEZE_LAYERS[0]):
                spec["out_channels"] = up(spec["out_channels"])
            if not name.endswith(SQUEEZE_LAYERS[1]) and spec["in_channels"] > 3:
                spec["in_channels"] = up(spec["in_channels"])
            if spec["groups"] > 1:
                spec["groups"] = up(spec["groups"])
        elif spec["type"] == "batchnorm":
            spec["num_features"] = up(spec["num_features"])
        elif spec["type"] == "linear":
            spec["in_features"] = up(spec["in_features"])
        modules[name] = spec
    return {**plan, "modules": modules}


class StageClock:
    """Forward hooks that stamp the time at the model's start and end and at every MBConv stage's start and end."""

    def __init__(self, model: torch.nn.Module) -> None:
        net = model.backbone.net
        self.names = ["stem"] + [f"stage {i}" for i in range(len(net._blocks))] + ["head"]
        self.stamps: list[float] = []
        stamp = self._stamp
        self.handles = [model.register_forward_pre_hook(stamp)]
        self.handles += [stage.register_forward_pre_hook(stamp) for stage in net._blocks]
        self.handles += [net._blocks[-1].register_forward_hook(stamp), model.register_forward_hook(stamp)]

    def _stamp(self, *_: object) -> None:
        self.stamps.append(time.perf_counter())

    def split(self) -> dict[str, float]:
        """The last forward pass's milliseconds per part (and `total`); clears the stamps."""
        stamps, self.stamps = self.stamps, []
        parts = {name: 1000 * (b - a) for name, a, b in zip(self.names, stamps, stamps[1:])}
        return {**parts, "total": 1000 * (stamps[-1] - stamps[0])}


def stage_mflops(model: torch.nn.Module, size: int = 224) -> dict[str, float]:
    """Million FLOPs of a batch-1 forward pass at `size` px, split like `StageClock` (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    counts = {name.split(".", 1)[-1]: sum(ops.values()) / 1e6 for name, ops in counter.get_flop_counts().items()}
    stages = len(model.backbone.net._blocks)
    parts = {"stem": counts.get("backbone.net._conv_stem", 0.0)}
    parts |= {f"stage {i}": counts.get(f"backbone.net._blocks.{i}", 0.0) for i in range(stages)}
    total = counts["Global"]
    return {**parts, "head": total - sum(parts.values()), "total": total}


def timed_passes(model: torch.nn.Module, runs: int, size: int = 224, warm_batch: int = 32) -> list[dict[str, float]]:
    """`runs` batch-1 passes at `size` px of a model warmed by one `warm_batch` pass, each split into stages."""
    clock = StageClock(model)
    x = torch.randn(1, 3, size, size)
    try:
        with torch.inference_mode():
            model(torch.randn(warm_batch, 3, size, size))
            for _ in range(3):
                model(x)
            clock.split()
            splits = []
            for _ in range(runs):
                model(x)
                splits.append(clock.split())
    finally:
        for handle in clock.handles:
            handle.remove()
    return splits


def load_models(out: Path, keys: list[str], num_classes: int, round_to: int | None) -> dict[str, torch.nn.Module]:
    rows = saved_rows(out)
    missing = [key for key in keys if key not in rows]
    if missing:
        raise SystemExit(f"{out}: no saved row {missing}; saved rows are {sorted(rows)}")
    models = {}
    for key in keys:
        models[key] = load_row_model(out, rows[key], num_classes)
        if round_to:
            plan = json.loads(Path(f"{row_model_stem(out, key)}.plan.json").read_text())
            model = build_model(rows[key]["net"], num_classes=num_classes, img_size=224, pretrained=False)
            models[f"{key} (round to {round_to})"] = apply_channel_plan(model, round_plan(plan, round_to)).eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a prune_benchmark.py --out folder")
    parser.add_argument("rows", nargs="+", help="saved rows, e.g. efficientnet-b0_beta-rank-inverse_50")
    parser.add_argument("--round-to", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="batch-1 passes per model and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flops-size", type=int, default=64, help="input size FLOPs are counted at")
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write every pass's split here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models(Path(args.out), args.rows, args.num_classes, args.round_to)
    passes: dict[str, list[dict[str, float]]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            passes[key] += timed_passes(model, args.runs)
    reference = next(iter(models.values()))
    base_flops = count_flops(reference, args.flops_size)
    parts = list(passes[next(iter(passes))][0])
    print(f"| model | FLOPs removed vs {args.rows[0]} | " + " | ".join(f"{p} ms" for p in parts) + " |")
    print("|---|---|" + "---|" * len(parts))
    summary = {}
    for key, model in models.items():
        medians = {p: float(np.median([s[p] for s in passes[key]])) for p in parts}
        removed = 1 - count_flops(model, args.flops_size) / base_flops
        summary[key] = {"flops_removed": removed, "p50_ms": medians, "mflops_224": stage_mflops(model)}
        print(f"| {key} | {100 * removed:.1f} % | " + " | ".join(f"{medians[p]:.2f}" for p in parts) + " |")
    print("\nMFLOPs at 224 px, batch 1:")
    for key, row in summary.items():
        print(f"| {key} | " + " | ".join(f"{row['mflops_224'][p]:.0f}" for p in parts) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "torch_threads": torch.get_num_threads(), "summary": summary,
                                         "passes": passes}))


if __name__ == "__main__":
    main()
