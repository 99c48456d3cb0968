"""Patch tensors and instance features: normalised patch batches, a frozen encoder's embeddings, the embedding cache."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipelines.bags import load_bag
from pipelines.config import TilingSettings

__all__ = ["cache_key", "cached_bag_features", "embed_patches", "patches_to_tensor"]

log = logging.getLogger(__name__)


def patches_to_tensor(
    patches: np.ndarray, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(N, size, size, 3) uint8 patches -> (N, 3, input_size, input_size) normalised float tensor."""
    x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size:
        x = torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def embed_patches(
    encoder: torch.nn.Module,
    patches: np.ndarray,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
) -> torch.Tensor:
    """Instance features (N, D) of a bag's patches through a (frozen) encoder, in eval mode."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(patches), batch_size):
        x = patches_to_tensor(patches[start : start + batch_size], input_size, mean, std).to(device)
        out.append(encoder(x).float().cpu())
    return torch.cat(out)


def cache_key(path: str | Path, settings: TilingSettings, encoder_id: str) -> str:
    """Cache file key: the slide file (path, size, mtime), the tiling settings and the encoder."""
    path = Path(path)
    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings.model_dump_json()}|{encoder_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_bag_features(
    slides: pd.DataFrame,
    settings: TilingSettings,
    encoder: torch.nn.Module,
    encoder_id: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: str | Path,
) -> dict[str, dict[str, torch.Tensor]]:
    """{slide_id: {"features": (N, D), "coords": (N, 2)}}; each slide is tiled and embedded once, then read back."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, torch.Tensor]] = {}
    hits = 0
    for slide in tqdm(slides.itertuples(index=False), total=len(slides), desc="embedding bags", leave=False):
        file = cache_dir / f"{slide.image_id}-{cache_key(slide.path, settings, encoder_id)}.safetensors"
        if file.is_file():
            out[slide.image_id] = load_file(file)
            hits += 1
            continue
        bag = load_bag(slide.path, settings, slide.image_id)
        entry = {
            "features": embed_patches(encoder, bag.patches, input_size, mean, std).contiguous(),
            "coords": torch.from_numpy(bag.coords.astype(np.int64)).contiguous(),
        }
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(entry, str(tmp))
        tmp.replace(file)
        out[slide.image_id] = entry
    log.info("bag features: %d slides, %d from the cache in %s", len(out), hits, cache_dir)
    return out
