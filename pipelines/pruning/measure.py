"""What pruning buys: FLOPs, parameters, weights-file size, CPU latency and throughput, serving latency."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "SERVING_CONDITIONS",
    "count_flops",
    "count_parameters",
    "latencies_ms",
    "measure_model",
    "measure_speed",
    "serving_latency",
    "weights_file_size",
]

SERVING_CONDITIONS = ("fresh", "warm", "frozen")


def count_flops(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """FLOPs of one forward pass at batch 1 (torch.utils.flop_counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def latencies_ms(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, runs: int, warmup: int) -> np.ndarray:
    """Wall time (ms) of each of `runs` calls `forward(x)`, after `warmup` untimed calls (no autograd)."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            forward(x)
        for _ in range(runs):
            started = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - started)
    return 1000 * np.asarray(times)


def measure_speed(model: nn.Module, input_size: int, runs: int = 50, batch: int = 32, warmup: int = 5) -> dict:
    """CPU latency at batch 1 (p50 and p90 of `runs` runs, ms) and throughput at `batch` (images/s)."""
    model = model.eval()
    xb = torch.randn(batch, 3, input_size, input_size)
    times = latencies_ms(model, torch.randn(1, 3, input_size, input_size), runs, warmup)
    with torch.no_grad():
        model(xb)
        started = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            model(xb)
        throughput = repeats * batch / (time.perf_counter() - started)
    return {
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p90": float(np.percentile(times, 90)),
        "throughput_images_per_s": float(throughput),
        "torch_threads": torch.get_num_threads(),
    }


def weights_file_size(model: nn.Module) -> int:
    """Bytes of the model's weights as a safetensors file."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def measure_model(model: nn.Module, input_size: int, speed: bool = True, runs: int = 50) -> dict:
    """Parameters, FLOPs, weights file size and (optionally) CPU latency/throughput of `model`."""
    report = {
        "params": count_parameters(model),
        "flops": count_flops(model, input_size),
        "file_bytes": weights_file_size(model),
        "input_size": input_size,
    }
    if speed:
        report.update(measure_speed(model, input_size, runs=runs))
    return report


def serving_latency(model: nn.Module, runs: int, input_size: int = 224, warmup: int = 3) -> dict[str, float]:
    """Batch-1 p50 latency (ms) of `model` at `input_size` px in three serving conditions, in this order, in one
    process (SERVING_CONDITIONS):

    - "fresh": a process that has only ever run batch 1 (a server's first requests);
    - "warm": after one batch-32 forward. glibc malloc then serves the large activations from its heap instead of
      fresh mmap pages (its mmap threshold rises when a large block is freed), which spares page faults;
    - "frozen": warm, and the model traced and frozen with TorchScript, which folds BatchNorm into the convolutions.

    Raises RuntimeError if the frozen model's outputs differ from the eager model's.
    """
    x = torch.randn(1, 3, input_size, input_size)

    def p50(forward: Callable[[torch.Tensor], Any]) -> float:
        return float(np.median(latencies_ms(forward, x, runs, warmup=warmup)))

    with torch.no_grad():
        result = {"fresh": p50(model)}
        model(torch.randn(32, 3, input_size, input_size))
        result["warm"] = p50(model)
        frozen = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))  # checked below
        if not torch.allclose(frozen(x), model(x), atol=1e-3, rtol=1e-3):
            raise RuntimeError("the frozen model's outputs differ from the eager model's")
        result["frozen"] = p50(frozen)
    return result
