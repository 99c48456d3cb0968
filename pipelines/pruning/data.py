"""The training images pruning looks at: a class-balanced calibration set (filter scores) and a random sample
(BatchNorm re-estimation), both drawn from manifest-like tables with a `seed`."""

from __future__ import annotations

import pandas as pd

__all__ = ["balanced_calibration_rows", "batchnorm_rows"]


def balanced_calibration_rows(train: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` training rows of every class (real images first), drawn with `seed`.

    `train` needs a `label` column; a `source` column (real/synthetic) puts real rows first when present."""
    if train.empty:
        raise ValueError("the manifest has no training rows to draw a calibration set from")
    rows = []
    for _, rows_of_class in train.groupby("label", sort=True):
        order = rows_of_class.sample(frac=1.0, random_state=seed)
        if "source" in order.columns:
            order = order.sort_values("source", kind="stable", key=lambda s: s != "real")
        rows.append(order.head(per_class))
    return pd.concat(rows)


def batchnorm_rows(train: pd.DataFrame, count: int, seed: int = 0) -> pd.DataFrame:
    """A random sample of `count` training rows (all of them when there are fewer), drawn with `seed`: the images
    BatchNorm statistics are re-estimated on, which should follow the training distribution, not the balanced one."""
    return train.sample(n=min(count, len(train)), random_state=seed)
