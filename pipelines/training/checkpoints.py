"""The trainer's files under `run_dir/checkpoints`: weights, the resumable `last` state, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "BEST_FILE",
    "BEST_RAW_FILE",
    "EMA_FILE",
    "LAST_RAW_FILE",
    "resume_checkpoint",
    "save_weights",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

BEST_FILE = "best.safetensors"  # the selected epoch's weights (the EMA's, when one is kept)
BEST_RAW_FILE = "best_raw.safetensors"  # the selected epoch's raw weights, when an EMA is kept
LAST_RAW_FILE = "last_raw.safetensors"  # the last epoch's raw weights, when an EMA is kept
EMA_FILE = "ema.safetensors"  # the EMA inside `checkpoints/last`


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's state dict as safetensors, written to a temporary name and swapped in."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def write_checkpoint(accelerator: Any, ckpt_dir: Path, state: dict[str, Any],
                     extra: dict[str, nn.Module] | None = None) -> None:
    """Write `checkpoints/last` atomically: save into a fresh folder, then swap it in."""
    tmp = ckpt_dir / f".last-{state['epoch']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Every rank writes its own random state into `tmp`: only swap the folder in once all of them have.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (extra or {}).items():
            save_weights(module, tmp / name)
        _atomic_json(tmp / "trainer_state.json", state)
        old = ckpt_dir / ".last-old"
        last = ckpt_dir / "last"
        if last.exists():
            os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_checkpoint(accelerator: Any, ckpt_dir: Path, state: dict[str, Any], ema: Any = None) -> bool:
    """Restore `checkpoints/last` (model, optimizer, scheduler, random states, `state` in place, the EMA) if it
    exists; True when it did."""
    last = ckpt_dir / "last"
    if not (last / "trainer_state.json").is_file():
        return False
    accelerator.load_state(str(last))
    state.update(json.loads((last / "trainer_state.json").read_text()))
    if ema is not None and (last / EMA_FILE).is_file():
        ema.module.load_state_dict(load_file(last / EMA_FILE, device="cpu"))
        ema.n_averaged.fill_(int(state.get("ema_updates", 1)))
    log.info("resumed from %s after epoch %d", last, state["epoch"])
    return True
