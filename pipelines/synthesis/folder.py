"""Ready-made synthetic images (e.g. a published set): read a folder of `<class>/<image>` files or a CSV of path and
class, draw a fixed number per class, and append them to the training split, optionally through the memorisation
guard."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.manifest import append_train_rows
from pipelines.synthesis.filters import MemorisationGuard
from pipelines.synthesis.generation import with_label_columns

__all__ = ["add_synthetic_folder", "sample_per_class", "synthetic_rows_from_folder"]

log = logging.getLogger(__name__)


def synthetic_rows_from_folder(
    folder: str | Path, csv: str | Path | None = None, class_column: str = "label", path_column: str = "path"
) -> pd.DataFrame:
    """Rows for ready-made synthetic images: a CSV (path + class columns) or `folder/<class>/<image>`."""
    from pipelines.images import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic image folder '{folder}' does not exist")
    if csv is not None:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        missing = [c for c in (path_column, class_column) if c not in table.columns]
        if missing:
            raise ValueError(
                f"'{csv}' lacks columns {missing}; it needs a path column '{path_column}' and a class "
                f"column '{class_column}' (see --path-column / --class-column)"
            )
        paths = [Path(p) if os.path.isabs(p) else folder / p for p in table[path_column]]
        labels = table[class_column].tolist()
    else:
        paths, labels = [], []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(file)
                    labels.append(class_dir.name)
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} synthetic images are missing, e.g. '{absent[0]}'")
    if not paths:
        raise ValueError(f"'{folder}' has no synthetic images (expected <class>/<image> files or a CSV)")
    ids = [f"synext_{p.stem}" for p in paths]
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [str(p.resolve()) for p in paths],
            "label": labels,
            "group": ids,
            "split": "train",
            "source": "synthetic",
            "synthesis_base": f"folder:{folder}",
        }
    )


def sample_per_class(rows: pd.DataFrame, classes: Sequence[str], per_class: int, seed: int = 0,
                     where: str = "the synthetic set") -> pd.DataFrame:
    """`per_class` rows of each class in `classes` (sorted), drawn with a fixed seed without replacement and kept in
    their order; refuses a class with fewer rows, naming the short classes and their counts (`where` names the
    source in that message)."""
    if per_class < 1:
        raise ValueError(f"{per_class} synthetic images per class requested; expected at least 1")
    available = rows.label.value_counts()
    short = {c: int(available.get(c, 0)) for c in classes if available.get(c, 0) < per_class}
    if short:
        raise ValueError(f"{where} has fewer than {per_class} images for classes {short}; expected at least "
                         f"{per_class} of each of {', '.join(sorted(classes))}")
    rng = np.random.default_rng(seed)
    picked = [rows[rows.label == c].iloc[np.sort(rng.choice(int(available[c]), per_class, replace=False))]
              for c in sorted(classes)]
    return pd.concat(picked, ignore_index=True)


def add_synthetic_folder(
    manifest: pd.DataFrame, rows: pd.DataFrame, guard: MemorisationGuard | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Append ready-made synthetic rows to the training split (optionally through the memorisation guard)."""
    from pipelines.images import load_image

    known = set(manifest.label)
    unknown = sorted(set(rows.label) - known)
    if unknown:
        raise ValueError(f"synthetic classes {unknown} are not in the manifest; its classes are {sorted(known)}")
    keep = np.ones(len(rows), bool)
    if guard is not None:
        real = manifest[(manifest.split == "train") & (manifest.source == "real")]
        guard.fit(real.path.tolist())
        for start in range(0, len(rows), 64):
            chunk = [load_image(p) for p in rows.path.iloc[start : start + 64]]
            keep[start : start + len(chunk)] = guard.keep(chunk)[0]
    stats = {}
    for label in sorted(set(rows.label)):
        of_class = (rows.label == label).to_numpy()
        stats[label] = {"offered": int(of_class.sum()), "dropped_memorisation": int((of_class & ~keep).sum())}
    return append_train_rows(manifest, with_label_columns(manifest, rows[keep])), stats
