"""The FLUX.1 pipeline: loading it (local folder or hub id) with its dtype, loading a LoRA into it (diffusers or kohya
format, see `pipelines.synthesis.kohya`), and fitting captions to what its text encoders take."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.synthesis.kohya import LoraReport, load_lora_file

__all__ = [
    "DTYPES",
    "LORA_WEIGHTS_NAME",
    "check_resolution",
    "fit_caption",
    "fit_captions_to_pipe",
    "load_flux_pipeline",
    "load_lora",
    "lora_weights_file",
    "torch_dtype",
]

log = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(mixed_precision: str) -> Any:
    """The torch dtype of an Accelerate mixed-precision setting ('no', 'fp16', 'bf16')."""
    import torch

    return getattr(torch, DTYPES[mixed_precision])


def lora_weights_file(lora: str | Path) -> Path:
    """The LoRA `.safetensors` file a path names: the file itself, or a folder's `pytorch_lora_weights.safetensors`."""
    lora = Path(lora)
    if lora.is_dir():
        lora = lora / LORA_WEIGHTS_NAME
    if not lora.is_file():
        raise FileNotFoundError(
            f"LoRA '{lora}' does not exist; expected a .safetensors file or a folder with {LORA_WEIGHTS_NAME}"
        )
    return lora


def load_flux_pipeline(
    base: str | Path, dtype: Any = None, device: str | Any = "cpu", lora: str | Path | None = None
) -> Any:
    """FluxPipeline from a local folder or hub id, optionally with a LoRA (diffusers or kohya format) loaded."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(base), dtype=dtype or torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipe, lora)
    return pipe


def load_lora(pipe: Any, lora: str | Path, adapter_name: str = "dermaflux") -> LoraReport:
    """Load a LoRA file or folder (ours in diffusers format, or a kohya / BFL-format FLUX LoRA with CLIP and T5
    keys) into `pipe`; returns (and logs) what was applied per component and refuses a file of which any tensor
    would be dropped (see `pipelines.synthesis.kohya`)."""
    return load_lora_file(pipe, lora_weights_file(lora), adapter_name)


def check_resolution(pipe: Any, resolution: int) -> None:
    """Refuse an image size the pipeline's VAE and 2x2 latent packing cannot take."""
    multiple = pipe.vae_scale_factor * 2
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a multiple of {multiple} for this FLUX VAE")


def _fits(tokenizer: Any, text: str, limit: int) -> bool:
    # Tokenised with truncation one past the limit: enough to tell, and no over-length warning from the tokenizer.
    return len(tokenizer(text, truncation=True, max_length=limit + 1).input_ids) <= limit


def fit_caption(caption: str, tokenizer: Any, limit: int) -> str:
    """The longest word-boundary prefix of `caption` that `tokenizer` encodes in at most `limit` tokens (special
    tokens included); the caption itself when it fits."""
    if _fits(tokenizer, caption, limit):
        return caption
    words = caption.split()
    low, high = 0, len(words)
    while low < high:  # binary search on the number of words kept
        middle = (low + high + 1) // 2
        if _fits(tokenizer, " ".join(words[:middle]), limit):
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def fit_captions_to_pipe(pipe: Any, captions: Sequence[str], max_sequence_length: int) -> list[str]:
    """Captions cut (once, at word boundaries) to what FLUX's text encoders take — CLIP's 77 tokens and T5's
    `max_sequence_length` — so that the pipeline never truncates them itself (with a warning per caption)."""
    limits = [(getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_max_length", 77)),
              (getattr(pipe, "tokenizer_2", None), max_sequence_length)]
    limits = [(tokenizer, limit) for tokenizer, limit in limits if tokenizer is not None]
    fitted = list(captions)
    for tokenizer, limit in limits:
        fitted = [fit_caption(caption, tokenizer, limit) for caption in fitted]
    cut = sum(a != b for a, b in zip(fitted, captions, strict=True))
    if cut:
        log.info("%d of %d captions are longer than the text encoders take (%s tokens) and were cut at a word "
                 "boundary to fit", cut, len(fitted), " / ".join(str(limit) for _, limit in limits))
    return fitted
