"""Shared fixtures: the embedded real sample, a small split manifest and a quickly trained bundle."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import pipelines  # noqa: F401 - offline/private environment defaults

REPO = Path(__file__).resolve().parent.parent
HAM_SAMPLE = REPO / "data" / "ham10000_sample"
UCSB_SAMPLE = REPO / "data" / "ucsb_breast_sample"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks: their ops take microseconds, and handing them between threads
    on a busy 2-core machine costs more than it saves (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ham_manifest() -> pd.DataFrame:
    """All 1,000 sample images, split by lesion (seed 0)."""
    from pipelines.manifest import grouped_split, ingest_ham10000

    return grouped_split(ingest_ham10000(HAM_SAMPLE), 0.15, 0.15, seed=0)


@pytest.fixture(scope="session")
def small_manifest(ham_manifest: pd.DataFrame, tmp_path_factory) -> Path:
    """A 7-class subset (up to 12 train, 4 val, 4 test images per class) written as a manifest CSV."""
    from pipelines.manifest import write_manifest

    quota = {"train": 12, "val": 4, "test": 4}
    parts = [rows.head(quota[split]) for (split, _), rows in ham_manifest.groupby(["split", "label"], sort=True)]
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(pd.concat(parts, ignore_index=True), path)
    return path


def tiny_config(run_dir: Path, **training):
    """A run config for a seconds-long CPU training of a tiny CNN at 32 px."""
    from pipelines.config import RunConfig

    settings = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_epochs": 0.5,
        "patience": 5,
        "seed": 0,
        "device": "cpu",
        **training,
    }
    return RunConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "data": {"format": "manifest", "manifest": "unused.csv"},
            "model": {"name": "small-cnn", "img_size": 32, "pretrained": False, "kwargs": {"widths": [8, 16]}},
            "training": settings,
        }
    )


@pytest.fixture(scope="session")
def tiny_bundle(small_manifest: Path, tmp_path_factory) -> Path:
    """A small-cnn bundle trained for 2 epochs on the small manifest (7 HAM10000 classes)."""
    from pipelines.training import train_from_config

    run_dir = tmp_path_factory.mktemp("tiny_run")
    return train_from_config(tiny_config(run_dir), run_dir, small_manifest)
