"""Ensemble bundles: several calibrated members in one folder, one card, their probabilities averaged."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_ensemble"]

log = logging.getLogger(__name__)


def build_ensemble(
    member_dirs: Sequence[str | Path],
    manifest_path: str | Path,
    out_dir: str | Path,
    target_sensitivity: float = 0.9,
    n_boot: int | None = None,
) -> dict[str, Any]:
    """Combine trained bundles into one ensemble bundle at `out_dir` and score it.

    Each member keeps its own preprocessing, calibration and test-time augmentation; the ensemble's probabilities
    are the mean of the members' calibrated probabilities, re-calibrated by one temperature fitted on the
    validation rows (a mean of calibrated members is under-confident). The referral threshold is chosen on the
    ensemble's calibrated validation probabilities (the manifest's real `val` rows), and the card records the
    ensemble's own validation and test metrics (with 95 % bootstrap intervals, `n_boot` resamples; 0: none); the
    members' own metrics and weight hashes go under `source_metrics`.
    Every member must know the same classes and have been trained on this manifest (its hash is checked).
    """
    from models.bundle import save_ensemble
    from pipelines.evaluation import source_metrics
    from pipelines.manifest import manifest_sha256, read_manifest

    manifest_path = Path(manifest_path)
    digest = manifest_sha256(manifest_path)
    members = _load_members(member_dirs, digest, manifest_path)
    class_names = members[0].class_names
    manifest = read_manifest(manifest_path)
    unknown = sorted(set(manifest.label) - set(class_names))
    if unknown:
        raise ValueError(f"manifest '{manifest_path}' has labels {unknown} the members do not know ({class_names})")
    malignant = [c for c in members[0].malignant_classes if c in class_names]
    scores = _mean_member_probs(members, manifest)
    if "val" not in scores:
        raise ValueError(f"manifest '{manifest_path}' has no real 'val' rows to choose the threshold on")
    calibration, scores = _calibrate(scores)
    card: dict[str, Any] = {"manifest_sha256": digest, "members_source": [str(Path(d)) for d in member_dirs],
                            "calibration": calibration}
    card.update(_threshold_and_metrics(scores, class_names, malignant, target_sensitivity, n_boot))
    card["source_metrics"] = {"members": [source_metrics(folder, bundle.card)
                                          for folder, bundle in zip(member_dirs, members)]}
    save_ensemble(out_dir, [(b.model, _member_card(b.card)) for b in members], card)
    log.info("ensemble of %d members written to %s", len(members), out_dir)
    return card


def _load_members(member_dirs: Sequence[str | Path], digest: str, manifest_path: Path) -> list[Any]:
    """The member bundles: two or more single image classifiers, each trained on this manifest."""
    from models.bundle import load_bundle

    if len(member_dirs) < 2:
        raise ValueError(f"an ensemble needs at least 2 member bundles, got {len(member_dirs)}")
    members = []
    for folder in member_dirs:
        bundle = load_bundle(folder)
        if bundle.is_ensemble:
            raise ValueError(f"bundle '{folder}' is itself an ensemble; list its members instead")
        if bundle.card.get("task", "image") != "image":
            raise ValueError(f"bundle '{folder}' is a {bundle.card.get('task')} model; ensembles combine image "
                             "classifiers")
        if bundle.card.get("manifest_sha256") not in (None, digest):
            raise ValueError(f"bundle '{folder}' was trained on another manifest than '{manifest_path}'; the "
                             "validation rows that choose the threshold could be its training images")
        members.append(bundle)
    return members


def _mean_member_probs(members: list[Any], manifest: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (labels, mean of the members' calibrated probabilities) on the real val and test rows, scored in
    memory exactly as the saved ensemble predicts (the Predictor averages the members' outputs)."""
    from models.bundle import Bundle
    from pipelines.prediction import Predictor

    class_names = members[0].class_names
    # The in-memory ensemble has no calibration of its own yet: the mean of the members' calibrated outputs.
    uncombined = {k: v for k, v in members[0].card.items() if k != "calibration"}
    predictor = Predictor(Bundle(model=members[0].model, card=uncombined, members=members))
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("val", "test"):
        rows = manifest[(manifest.split == split) & (manifest.source == "real")]
        if rows.empty:
            continue
        table, errors = predictor.predict_files(rows.path.tolist())
        if errors:
            raise ValueError(f"{len(errors)} {split} images could not be read, first: {errors[0]}")
        labels = np.array([class_names.index(c) for c in rows.label])
        scores[split] = (labels, table[[f"prob_{c}" for c in class_names]].to_numpy())
    return scores


def _calibrate(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One temperature on the validation mean (a mean of calibrated members is under-confident), applied to every
    split."""
    from pipelines.calibration import fit_calibration
    from pipelines.prediction import combine_members

    val_labels, val_mean = scores["val"]
    calibration = fit_calibration(np.log(np.clip(val_mean, 1e-12, None)), val_labels, "temperature",
                                  f"validation split ({len(val_labels)} images), on the mean of the members' "
                                  "calibrated probabilities")
    return calibration, {split: (labels, combine_members([probs], calibration))
                         for split, (labels, probs) in scores.items()}


def _threshold_and_metrics(scores: dict[str, Any], class_names: list[str], malignant: list[str],
                           target_sensitivity: float, n_boot: int | None) -> dict[str, Any]:
    """The card's referral threshold (chosen on validation) and each split's metrics with bootstrap intervals."""
    from pipelines.evaluation import (
        BOOTSTRAP_RESAMPLES,
        bootstrap_intervals,
        card_metrics,
        compute_metrics,
        referral_threshold,
    )

    threshold = referral_threshold(*scores["val"], class_names, malignant, target_sensitivity)
    op = threshold["threshold"] if threshold else None
    names = {"val": "validation", "test": "test"}
    n_boot = BOOTSTRAP_RESAMPLES if n_boot is None else n_boot
    metrics = {}
    for split, (labels, probs) in scores.items():
        metrics[names[split]] = compute_metrics(labels, probs, class_names, malignant, op)
        intervals = bootstrap_intervals(labels, probs, class_names, malignant, op, n_boot)
        if intervals is not None:
            metrics[names[split]]["intervals"] = intervals
    return {"operating_threshold": op, "threshold_metrics": threshold,
            "metrics": {split: card_metrics(m) for split, m in metrics.items()}}


def _member_card(card: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in card.items() if k not in ("format_version", "versions")}
