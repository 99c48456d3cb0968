"""Manifest CSVs: read the HAM10000/ISIC and class-per-folder layouts, split by group, guard against leakage."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import HAM10000_MALIGNANT, DataConfig
from pipelines.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["image_id", "path", "label", "group", "split", "source"]
SPLITS = ("train", "val", "test")
SOURCES = ("real", "synthetic")
HAM10000_COLUMNS = ["image_id", "lesion_id", "dx"]
# Below this many images a class gets a warning at ingest: a 15 % test split then holds 3 or fewer of its images,
# so its recall (and its share of the malignant AUC) is noise.
MIN_IMAGES_PER_CLASS = 20


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _read_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV of strings (blanks stay ''), raising a one-line error if it is empty or lacks `columns`."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"'{path}' is empty; expected {what} with columns {list(columns)}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ManifestError(
            f"'{path}' lacks columns {missing}; expected {what} with columns {list(columns)}, "
            f"it has {list(table.columns)}"
        )
    if table.empty:
        raise ManifestError(f"'{path}' has a header but no rows; expected one row per image")
    return table


def _check_unique_and_filled(table: pd.DataFrame, id_column: str, columns: Sequence[str], where: str) -> None:
    """Raise if any of `columns` is blank or `id_column` repeats, naming the first offending values."""
    for column in columns:
        blank = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if blank.any():
            first = (f"{id_column} {table.loc[blank, id_column].iloc[0]!r}" if column != id_column
                     else f"data row {int(np.flatnonzero(blank.to_numpy())[0]) + 1}")
            raise ManifestError(
                f"{where} has {_plural(int(blank.sum()), 'row')} with a blank {column}, e.g. {first}; "
                f"every image needs a {column}"
            )
    repeated = table[id_column][table[id_column].duplicated(keep=False)]
    if len(repeated):
        counts = repeated.value_counts(sort=False)  # in file order: the first repeats are named first
        first = ", ".join(f"{v!r} ({n}x)" for v, n in counts.head(3).items())
        raise ManifestError(
            f"{where} repeats {_plural(len(counts), id_column)} ({len(repeated)} rows), e.g. {first}; "
            f"each {id_column} must be unique"
        )


def check_labels(
    labels: pd.Series,
    where: str,
    classes: Sequence[str] | None = None,
    malignant_classes: Sequence[str] | None = None,
    min_images: int = MIN_IMAGES_PER_CLASS,
) -> dict[str, int]:
    """Check image labels against the expected classes and the malignant ones; return the count per class.

    With `classes`, a label outside it is an error; without, the classes found are logged with their counts.
    Either way a name in `malignant_classes` that is not a class is an error (a typo would otherwise drop that
    class from the malignant AUC and the referral threshold), and classes under `min_images` get a warning.
    """
    labels = labels.astype(str)
    blank = labels.str.strip() == ""
    if blank.any():
        raise ManifestError(f"{_plural(int(blank.sum()), 'image')} in {where} have a blank label")
    counts = labels.value_counts().sort_index()
    if classes is not None:
        unknown = counts[~counts.index.isin(list(classes))]
        if len(unknown):
            names = ", ".join(f"'{c}' ({_plural(int(n), 'image')})" for c, n in unknown.items())
            raise ManifestError(
                f"unknown {'class' if len(unknown) == 1 else 'classes'} {names} in {where}; "
                f"expected one of {', '.join(classes)}"
            )
        absent = [c for c in classes if c not in counts.index]
        if absent:
            log.warning("listed classes with no images in %s: %s", where, ", ".join(absent))
    known = list(classes) if classes is not None else list(counts.index)
    if malignant_classes is not None:
        wrong = [c for c in malignant_classes if c not in known]
        if wrong:
            raise ManifestError(
                f"malignant_classes names {', '.join(repr(c) for c in wrong)}, which "
                f"{'is not a class' if len(wrong) == 1 else 'are not classes'} in {where}; "
                f"classes: {', '.join(known)}"
            )
    log.info("classes in %s: %s", where, ", ".join(f"{c} {n}" for c, n in counts.items()))
    small = counts[counts < min_images]
    if len(small):
        log.warning(
            "classes with fewer than %d images in %s: %s; their test metrics will be noise",
            min_images, where, ", ".join(f"{c} ({n})" for c, n in small.items()),
        )
    return {str(c): int(n) for c, n in counts.items()}


def ingest_ham10000(
    root: str | Path,
    metadata: str | Path | None = None,
    images: list[str | Path] | None = None,
    malignant_classes: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Manifest rows for the HAM10000/ISIC layout: `metadata.csv` (image_id, lesion_id, dx, ...) + image folder(s).

    `classes` and `malignant_classes`, when given, are checked against the `dx` values (see `check_labels`);
    the `malignant` column uses `malignant_classes` or the HAM10000 default (mel, bcc, akiec).
    """
    root = Path(root)
    metadata_path = Path(metadata) if metadata else root / "metadata.csv"
    if not metadata_path.is_file():
        raise ManifestError(
            f"HAM10000 metadata '{metadata_path}' does not exist; expected metadata.csv with {HAM10000_COLUMNS}"
        )
    meta = _read_table(metadata_path, HAM10000_COLUMNS, "HAM10000 metadata")
    _check_unique_and_filled(meta, "image_id", HAM10000_COLUMNS, f"'{metadata_path}'")
    check_labels(meta.dx, f"'{metadata_path}'", classes, malignant_classes)
    index = _index_images([Path(p) for p in images] if images else [root / "images"])
    absent = [i for i in meta.image_id if i not in index]
    if absent:
        raise ManifestError(f"{len(absent)} images listed in '{metadata_path}' are missing, e.g. '{absent[0]}'")
    df = pd.DataFrame(
        {
            "image_id": meta.image_id,
            "path": [str(index[i]) for i in meta.image_id],
            "label": meta.dx,
            "group": meta.lesion_id,
            "split": "",
            "source": "real",
        }
    )
    malignant = HAM10000_MALIGNANT if malignant_classes is None else tuple(malignant_classes)
    df["malignant"] = df.label.isin(malignant).astype(int)
    # Read as text so that blanks are caught above; numbers keep their type in the manifest.
    typed = pd.read_csv(metadata_path, usecols=lambda c: c in ("dx_type", "age", "sex", "localization"))
    for column in ("dx_type", "age", "sex", "localization"):
        if column in typed.columns:
            df[column] = typed[column].values
    return df


def _folder_image_ids(root: Path, files: list[Path]) -> list[str]:
    """Image ids for `root/<class>/<file>`: the file stem, or the relative path where stems collide.

    A stem found once in the dataset is the id (`ISIC_0024306`), as HAM10000/ISIC names are. Files sharing a stem
    get their path relative to the root without the extension (`a/img1`, `b/img1`), or with it where that still
    collides (`a/img1.jpg`, `a/img1.png`). Ids thus only depend on the files, not on the order they are read in.
    """
    stems = Counter(f.stem for f in files)
    relative = [f.relative_to(root) for f in files]
    without_suffix = Counter(r.with_suffix("").as_posix() for r in relative)
    ids = []
    for file, rel in zip(files, relative):
        if stems[file.stem] == 1:
            ids.append(file.stem)
        elif without_suffix[rel.with_suffix("").as_posix()] == 1:
            ids.append(rel.with_suffix("").as_posix())
        else:
            ids.append(rel.as_posix())
    return ids


def _read_groups(groups_path: Path, image_ids: pd.Series) -> pd.Series:
    """The `group` of each image from `groups.csv` (image_id,group); unlisted images are their own group."""
    groups = _read_table(groups_path, ["image_id", "group"], "a groups file")
    _check_unique_and_filled(groups, "image_id", ["image_id", "group"], f"'{groups_path}'")
    folder_ids = {i.rsplit("/", 1)[-1] for i in image_ids if "/" in i}
    ambiguous = sorted((set(groups.image_id) - set(image_ids)) & folder_ids)
    if ambiguous:
        raise ManifestError(
            f"'{groups_path}' names image_id {ambiguous[0]!r}, which several class folders hold; "
            f"use the id with its folder, e.g. {next(i for i in image_ids if i.endswith('/' + ambiguous[0]))!r}"
        )
    unmatched = sorted(set(groups.image_id) - set(image_ids))
    if unmatched:
        log.warning("%d image_ids in '%s' match no image, e.g. '%s'", len(unmatched), groups_path, unmatched[0])
    return image_ids.map(groups.set_index("image_id")["group"]).fillna(image_ids)


def ingest_class_folders(
    root: str | Path,
    groups_csv: str | Path | None = None,
    classes: Sequence[str] | None = None,
    malignant_classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Manifest rows for `root/<class>/<image>`; groups from `groups.csv` (image_id,group) or the image id.

    Image ids are file stems, made unique with the class folder where stems repeat (see `_folder_image_ids`).
    `classes` and `malignant_classes`, when given, are checked against the folder names (see `check_labels`).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"dataset folder '{root}' does not exist")
    files, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(class_dir.name)
    if not files:
        raise ManifestError(f"'{root}' has no <class>/<image> files ({sorted(IMAGE_SUFFIXES)})")
    df = pd.DataFrame(
        {"image_id": _folder_image_ids(root, files), "path": [str(f.resolve()) for f in files], "label": labels}
    )
    check_labels(df.label, f"'{root}'", classes, malignant_classes)
    groups_path = Path(groups_csv) if groups_csv else root / "groups.csv"
    if groups_csv and not groups_path.is_file():
        raise ManifestError(f"groups file '{groups_path}' does not exist; expected a CSV with image_id,group")
    df["group"] = _read_groups(groups_path, df.image_id) if groups_path.is_file() else df.image_id
    df["split"], df["source"] = "", "real"
    return df


def grouped_split(
    df: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> pd.DataFrame:
    """Assign train/val/test so that no group spans two splits and each class keeps its proportions."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ManifestError(f"split fractions val={val_fraction}, test={test_fraction} must be in (0, 1) and sum < 1")
    from sklearn.model_selection import StratifiedGroupKFold

    _check_unique_and_filled(df, "image_id", ["image_id", "group", "label"], "the images to split")
    df = df.copy()
    df["group"] = df.group.astype(str)
    names = ["train", "val", "test"] if test_fraction > 0 else ["train", "val"]
    # Every class needs a group in every split, or a split (usually test) silently lacks it.
    per_class = df.groupby("label")["group"].nunique().sort_values()
    too_few = per_class[per_class < len(names)]
    if len(too_few):
        label, n = too_few.index[0], int(too_few.iloc[0])
        raise ManifestError(
            f"class '{label}' has {_plural(int((df.label == label).sum()), 'image')} in {_plural(n, 'group')}; "
            f"a grouped {'/'.join(names)} split needs at least {len(names)} groups per class"
            + (f" ({len(too_few)} classes are short)" if len(too_few) > 1 else "")
        )
    # One label per group (its most frequent one) so that stratification works at the group level.
    group_label = df.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    labels = df.group.map(group_label).to_numpy()
    groups = df.group.to_numpy()
    split = np.array(["train"] * len(df), dtype=object)

    def carve(mask: np.ndarray, fraction: float, name: str, rng_seed: int) -> None:
        n_folds = max(2, int(round(1 / fraction)))
        idx = np.flatnonzero(mask)
        n_groups = len(set(groups[idx]))
        largest = pd.Series(labels[idx]).value_counts()
        # StratifiedGroupKFold's own needs: n_folds groups, and n_folds images in at least one class.
        if n_groups < n_folds or largest.iloc[0] < n_folds:
            raise ManifestError(
                f"{_plural(len(idx), 'image')} in {_plural(n_groups, 'group')} (the largest class, "
                f"'{largest.index[0]}', has {largest.iloc[0]}) are too few for a {fraction:.0%} grouped {name} split: "
                f"it needs at least {n_folds} groups and {n_folds} images of one class"
            )
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


def read_dataset(data: DataConfig, check_malignant: bool = True) -> pd.DataFrame:
    """The manifest rows of the configured dataset (a manifest CSV, the HAM10000 layout or class folders).

    Labels are checked against data.classes (or the classes found) and, with `check_malignant`, against
    data.malignant_classes; without it the HAM10000 layout marks its usual malignant classes, class folders none.
    """
    malignant = data.malignant_classes if check_malignant else None
    if data.format == "manifest":
        df = read_manifest(data.manifest)
        check_labels(df.label, f"'{data.manifest}'", data.classes, malignant)
        return df
    if data.format == "ham10000":
        return ingest_ham10000(data.root, data.metadata, data.images, malignant, data.classes)
    return ingest_class_folders(data.root, data.groups, data.classes, malignant)
