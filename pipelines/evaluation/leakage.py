"""Where a bundle's numbers come from, and whether evaluated images were its training images (leakage check)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_MANIFEST_BYTES",
    "TRAINING_IMAGES_FILE",
    "bundle_sha256",
    "check_training_overlap",
    "count_training_images",
    "source_metrics",
    "training_rows_of",
    "write_training_images",
]

log = logging.getLogger(__name__)

def bundle_sha256(bundle_dir: str | Path) -> str:
    """SHA-256 of a bundle's weights file; for an ensemble, of its members' hashes in order."""

    from models.bundle import ENSEMBLE, WEIGHTS_FILE, read_card

    path = Path(bundle_dir)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        digest = hashlib.sha256()
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    members = (read_card(path).get(ENSEMBLE) or {}).get("members")
    if not members:
        raise FileNotFoundError(f"model bundle '{path}' has no {WEIGHTS_FILE}")
    return hashlib.sha256("".join(bundle_sha256(path / m) for m in members).encode()).hexdigest()


def source_metrics(bundle_dir: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """The `source_metrics` block of a bundle derived from the one at `bundle_dir` (pruned, re-balanced): that
    bundle's path, weights hash and training-manifest hash, and its own validation/test metrics. A derived bundle's
    `metrics` are always its own."""
    own = {k: v for k, v in (card.get("metrics") or {}).items() if k in ("validation", "test")}
    return {"bundle": str(bundle_dir), "bundle_sha256": bundle_sha256(bundle_dir),
            "manifest_sha256": card.get("manifest_sha256"), **own}


MAX_MANIFEST_BYTES = 512 * 1024 * 1024  # CSVs beside a bundle larger than this are not hashed in the search


TRAINING_IMAGES_FILE = "training_images.csv"  # name (file stem) and label of each training image, in the bundle


def write_training_images(bundle_dir: str | Path, train_rows: Any) -> Path:
    """Record the names and labels of a bundle's training images in the bundle, so a copied bundle can still tell
    when it is evaluated on them (image names only: no paths, no pixels)."""
    import pandas as pd

    path = Path(bundle_dir) / TRAINING_IMAGES_FILE
    table = pd.DataFrame({"name": [Path(p).stem for p in train_rows.path], "label": list(train_rows.label)})
    table.sort_values(["label", "name"]).to_csv(path, index=False)
    return path


def training_rows_of(bundle_dir: str | Path, card: dict[str, Any], candidates: Sequence[str | Path] = ()
                     ) -> tuple[Any, Path] | None:
    """(training rows, where they were read) of the images a bundle was trained on, when they can be found: one of
    `candidates` or a CSV beside the bundle (a run directory's manifests) whose SHA-256 is the card's
    `manifest_sha256`, else the bundle's own `training_images.csv` (names and labels); None otherwise."""
    import pandas as pd

    from pipelines.manifest import manifest_sha256, read_manifest

    digest = card.get("manifest_sha256")
    own = Path(bundle_dir) / TRAINING_IMAGES_FILE
    if not digest:
        return None
    beside = sorted(Path(bundle_dir).resolve().parent.glob("*.csv"))
    seen = set()
    for path in [Path(c) for c in candidates] + beside:
        key = path.resolve()
        if key in seen or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            continue
        seen.add(key)
        if manifest_sha256(path) == digest:
            manifest = read_manifest(path)
            return manifest[manifest.split == "train"], path
    if own.is_file():
        table = pd.read_csv(own, dtype=str, keep_default_na=False)
        return pd.DataFrame({"path": table["name"], "label": table["label"]}), own
    return None


def count_training_images(train_rows: Any, rows: Any) -> int:
    """How many of `rows` are training images: the same file, or a file of the same name (without its suffix) and
    the same label, as when a dataset was copied or re-ingested elsewhere."""
    paths = {str(Path(p).resolve()) for p in train_rows.path}
    names = {(Path(p).stem, str(label)) for p, label in zip(train_rows.path, train_rows.label)}
    return int(sum(str(Path(p).resolve()) in paths or (Path(p).stem, str(label)) in names
                   for p, label in zip(rows.path, rows.label)))


def check_training_overlap(bundle_dir: str | Path, card: dict[str, Any], rows: Any, what: str = "evaluated",
                           candidates: Sequence[str | Path] = ()) -> dict[str, Any] | None:
    """Warn loudly when `rows` (manifest rows about to be scored) include images the bundle was trained on.

    The training images are the `train` rows of the bundle's training manifest, found by its hash (see
    `training_rows_of`). Returns {"training_images", "checked", "what", "training_manifest"}, or None (with a log line)
    when the training images cannot be known.
    """
    found = training_rows_of(bundle_dir, card, candidates)
    if found is None:
        log.info("bundle '%s': its training manifest is not at hand, so the %s images were not checked against its "
                 "training images", bundle_dir, what)
        return None
    train_rows, path = found
    count = count_training_images(train_rows, rows)
    if count:
        log.warning("%d of the %d %s images were used to train bundle '%s' (training manifest '%s'): metrics on "
                    "them overstate how well it does on new images", count, len(rows), what, bundle_dir, path)
    return {"training_images": count, "checked": int(len(rows)), "what": what, "training_manifest": str(path)}
