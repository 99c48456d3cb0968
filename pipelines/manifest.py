"""Manifest CSVs: read the HAM10000/ISIC and class-per-folder layouts, split by group, guard against leakage."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["image_id", "path", "label", "group", "split", "source"]
SPLITS = ("train", "val", "test")
SOURCES = ("real", "synthetic")
HAM10000_COLUMNS = ["image_id", "lesion_id", "dx"]
DEFAULT_MALIGNANT = ("mel", "bcc", "akiec")


class ManifestError(ValueError):
    """A manifest or dataset layout that does not have what a stage needs."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV and check its columns and values."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' does not exist")
    df = pd.read_csv(path, dtype={"image_id": str, "group": str, "label": str, "split": str}, keep_default_na=False)
    validate_manifest(df, str(path))
    # Relative image paths are relative to the manifest's folder, so a run directory can be moved whole.
    base = path.resolve().parent
    df["path"] = [p if os.path.isabs(p) else str(base / p) for p in df.path]
    return df


def validate_manifest(df: pd.DataFrame, name: str = "manifest") -> None:
    """Raise ManifestError if columns are missing or split/source hold unknown values."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{name} lacks columns {missing}; a manifest needs {REQUIRED_COLUMNS}")
    bad_split = sorted(set(df["split"]) - set(SPLITS) - {""})
    if bad_split:
        raise ManifestError(f"{name} has unknown split values {bad_split}; expected {list(SPLITS)}")
    bad_source = sorted(set(df["source"]) - set(SOURCES))
    if bad_source:
        raise ManifestError(f"{name} has unknown source values {bad_source}; expected {list(SOURCES)}")


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest atomically (temp file + rename), so a killed run never leaves half a CSV."""
    validate_manifest(df, str(path))
    return write_csv_atomic(df, path)


def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a CSV via a temp file + rename, so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as handle:
        df.to_csv(handle, index=False)
    os.replace(tmp, path)
    return path


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of a manifest file, recorded in bundles for provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _index_images(folders: list[Path]) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise ManifestError(f"image folder '{folder}' does not exist")
        for file in folder.iterdir():
            if file.suffix.lower() in IMAGE_SUFFIXES:
                index[file.stem] = file.resolve()
    return index


def ingest_ham10000(
    root: str | Path,
    metadata: str | Path | None = None,
    images: list[str | Path] | None = None,
    malignant_classes: tuple[str, ...] = DEFAULT_MALIGNANT,
) -> pd.DataFrame:
    """Manifest rows for the HAM10000/ISIC layout: `metadata.csv` (image_id, lesion_id, dx, ...) + image folder(s)."""
    root = Path(root)
    metadata_path = Path(metadata) if metadata else root / "metadata.csv"
    if not metadata_path.is_file():
        raise ManifestError(
            f"HAM10000 metadata '{metadata_path}' does not exist; expected metadata.csv with {HAM10000_COLUMNS}"
        )
    meta = pd.read_csv(metadata_path, dtype={"image_id": str, "lesion_id": str})
    missing = [c for c in HAM10000_COLUMNS if c not in meta.columns]
    if missing:
        raise ManifestError(f"'{metadata_path}' lacks columns {missing}; HAM10000 metadata needs {HAM10000_COLUMNS}")
    index = _index_images([Path(p) for p in images] if images else [root / "images"])
    absent = [i for i in meta.image_id if i not in index]
    if absent:
        raise ManifestError(f"{len(absent)} images listed in '{metadata_path}' are missing, e.g. '{absent[0]}'")
    df = pd.DataFrame(
        {
            "image_id": meta.image_id,
            "path": [str(index[i]) for i in meta.image_id],
            "label": meta.dx.astype(str),
            "group": meta.lesion_id.astype(str),
            "split": "",
            "source": "real",
        }
    )
    df["malignant"] = df.label.isin(malignant_classes).astype(int)
    for column in ("dx_type", "age", "sex", "localization"):
        if column in meta.columns:
            df[column] = meta[column].values
    return df


def ingest_class_folders(root: str | Path, groups_csv: str | Path | None = None) -> pd.DataFrame:
    """Manifest rows for `root/<class>/<image>`; groups from `groups.csv` (image_id,group) or the file stem."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"dataset folder '{root}' does not exist")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"image_id": file.stem, "path": str(file.resolve()), "label": class_dir.name})
    if not rows:
        raise ManifestError(f"'{root}' has no <class>/<image> files ({sorted(IMAGE_SUFFIXES)})")
    df = pd.DataFrame(rows)
    groups_path = Path(groups_csv) if groups_csv else root / "groups.csv"
    if groups_path.is_file():
        groups = pd.read_csv(groups_path, dtype=str).set_index("image_id")["group"]
        df["group"] = df.image_id.map(groups).fillna(df.image_id)
    else:
        df["group"] = df.image_id
    df["split"], df["source"] = "", "real"
    return df


def grouped_split(
    df: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> pd.DataFrame:
    """Assign train/val/test so that no group spans two splits and each class keeps its proportions."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ManifestError(f"split fractions val={val_fraction}, test={test_fraction} must be in (0, 1) and sum < 1")
    from sklearn.model_selection import StratifiedGroupKFold

    df = df.copy()
    # One label per group (its most frequent one) so that stratification works at the group level.
    group_label = df.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    labels = df.group.map(group_label).to_numpy()
    groups = df.group.to_numpy()
    split = np.array(["train"] * len(df), dtype=object)

    def carve(mask: np.ndarray, fraction: float, name: str, rng_seed: int) -> None:
        n_folds = max(2, int(round(1 / fraction)))
        idx = np.flatnonzero(mask)
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=rng_seed)
        _, held = next(splitter.split(idx, labels[idx], groups[idx]))
        split[idx[held]] = name

    if test_fraction > 0:
        carve(split == "train", test_fraction, "test", seed)
    carve(split == "train", val_fraction / (1 - test_fraction), "val", seed + 1)
    df["split"] = split
    check_no_group_leakage(df)
    return df


def check_no_group_leakage(df: pd.DataFrame) -> None:
    """Raise ManifestError if any group (lesion or patient) appears in more than one split."""
    real = df[df.split.isin(SPLITS)]
    spread = real.groupby("group")["split"].nunique()
    leaked = spread[spread > 1]
    if len(leaked):
        raise ManifestError(f"{len(leaked)} groups appear in several splits, e.g. '{leaked.index[0]}'")


def append_train_rows(manifest: pd.DataFrame, new_rows: pd.DataFrame) -> pd.DataFrame:
    """Add synthetic or oversampled rows to the training split only; every existing row is kept unchanged."""
    if "split" in new_rows.columns and (new_rows.split != "train").any():
        bad = new_rows.loc[new_rows.split != "train", "split"].iloc[0]
        raise ManifestError(
            f"added rows must have split=train, got split='{bad}': resampling touches training data only"
        )
    new_rows = new_rows.assign(split="train")
    missing = [c for c in ("image_id", "path", "label", "source") if c not in new_rows.columns]
    if missing:
        raise ManifestError(f"added rows lack columns {missing}")
    if "group" not in new_rows.columns:
        new_rows = new_rows.assign(group=new_rows.image_id)
    # Integer columns stay integers (nullable), so held-out rows serialise byte-identically before and after.
    integer_columns = [c for c in manifest.columns if pd.api.types.is_integer_dtype(manifest[c])]
    combined = pd.concat([manifest.astype({c: "Int64" for c in integer_columns}), new_rows], ignore_index=True).astype(
        {c: "Int64" for c in integer_columns}
    )
    for column in combined.columns:
        if combined[column].dtype == object:
            combined[column] = combined[column].fillna("")
    return combined


def class_names_of(df: pd.DataFrame) -> list[str]:
    """Sorted class names present in a manifest."""
    return sorted(df.label.astype(str).unique())
