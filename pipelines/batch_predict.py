"""`lesionlab predict` at scale: streaming, bounded memory, resumable, shardable over processes or machines.

Files are decoded in worker threads one batch ahead of the network (at most two batches of images in memory),
and each batch's rows are appended to the CSV as soon as they are computed, so memory stays flat whatever the
folder's size and a killed job loses at most one batch. `resume=True` skips the image ids already in the output.
A shard (`K/N`, or the `RANK`/`WORLD_SIZE` that `torchrun` and `accelerate launch` set) takes every N-th file
starting at K and writes its own CSV (`preds.csv` -> `preds.rank<K>-of-<N>.csv`); the parts concatenate into the
whole.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.images import ImageError, load_image
from pipelines.prediction import Predictor

log = logging.getLogger(__name__)


@dataclass
class StreamResult:
    """What a streaming prediction did: rows written now, ids skipped as already done, files that failed."""

    out: Path
    written: int = 0
    resumed: int = 0
    errors: list[ImageError] = field(default_factory=list)


def parse_shard(text: str | None) -> tuple[int, int]:
    """(index, count) from 'K/N', else from RANK/WORLD_SIZE (torchrun, accelerate launch), else (0, 1)."""
    if text:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard takes K/N (e.g. 0/4), got '{text}'") from None
    else:
        index, count = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: expected 0 <= K < N")
    return index, count


def shard_output(out: str | Path, index: int, count: int) -> Path:
    """The CSV a shard writes: the output itself for one shard, `<stem>.rank<K>-of-<N><suffix>` otherwise."""
    out = Path(out)
    return out if count == 1 else out.with_name(f"{out.stem}.rank{index}-of-{count}{out.suffix}")


def _done_ids(out: Path, columns: list[str]) -> set[str]:
    """Image ids already in `out`; a last line cut off by a killed job is removed first."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):  # a partial last row: drop it, it is predicted again
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as handle:
            handle.truncate(cut)
    table = pd.read_csv(out, dtype={"image_id": str}, keep_default_na=False)
    if list(table.columns) != columns:
        raise ValueError(f"'{out}' has columns {list(table.columns)}, not this bundle's {columns}; write to a new file "
                         "or drop --resume")
    return set(table.image_id)


def _load(path: Path, predictor: Predictor) -> Image.Image | ImageError:
    try:
        return load_image(path, predictor.limits)
    except ImageError as err:
        return err


def predict_stream(predictor: Predictor, paths: Sequence[str | Path], out: str | Path, batch_size: int = 32,
                   workers: int = 2, resume: bool = False, progress: bool = True) -> StreamResult:
    """Predict `paths` batch by batch into the CSV `out` (columns as `Predictor.table`), decoding ahead in threads.

    Without `resume` an existing `out` is replaced; with it, ids already there are skipped and new rows appended.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(predictor.table([], np.zeros((0, len(predictor.class_names)))).columns)
    done = _done_ids(out, columns) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [Path(p) for p in paths if Path(p).stem not in done]
    result = StreamResult(out=out, resumed=len(paths) - len(todo))
    if result.resumed:
        log.info("%s: %d images already predicted, %d to go", out, result.resumed, len(todo))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress or not todo, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, open(out, "a", newline="") as handle:
        if handle.tell() == 0:
            handle.write(",".join(columns) + "\n")
            handle.flush()

        def submit(batch: list[Path]) -> list[Future]:
            return [pool.submit(_load, path, predictor) for path in batch]

        pending = submit(batches[0]) if batches else []
        for number, batch in enumerate(batches):
            loaded = [future.result() for future in pending]
            pending = submit(batches[number + 1]) if number + 1 < len(batches) else []  # decode one batch ahead
            images, ids = [], []
            for path, item in zip(batch, loaded):
                if isinstance(item, ImageError):
                    log.warning("skipped: %s", item)
                    result.errors.append(item)
                else:
                    images.append(item)
                    ids.append(path.stem)
            if images:
                table = predictor.table(ids, predictor.predict(images))
                handle.write(table.to_csv(index=False, header=False, float_format="%.6f"))
                handle.flush()
                result.written += len(images)
            bar.update(len(batch))
    bar.close()
    return result
