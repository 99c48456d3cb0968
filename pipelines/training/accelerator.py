"""The Hugging Face Accelerate runtime the trainer runs under (CPU, one GPU, or many via `accelerate launch`)."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.config import TrainSettings

__all__ = ["make_accelerator"]


def make_accelerator(settings: TrainSettings) -> Any:
    """An Accelerator for the requested device and precision (float32 on CPU unless asked)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available")
    mixed = settings.mixed_precision
    if cpu and mixed == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; use bf16 or 'no' on CPU")
    # A seedable sampler makes each epoch's shuffle a function of (seed, epoch): a resumed run sees the same order.
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    set_seed(settings.seed)
    return accelerator
