"""Metrics that matter under imbalance, the validation-chosen operating threshold, plots and the run report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

log = logging.getLogger(__name__)

# The scalar metrics a report lists first and a model card keeps.
HEADLINE_METRICS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_auc",
    "malignant_auc",
    "sensitivity_at_80_specificity",
    "sensitivity_at_90_specificity",
    "ece",
)

# Every report's 95 % intervals: a stratified bootstrap with this many resamples and this seed (see
# `bootstrap_intervals`); a report's caller may pass another number, 0 for none.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a model card shows (no confusion matrix)."""
    keep = (*HEADLINE_METRICS, "at_operating_threshold", "ece_uncalibrated", "intervals")
    headline = {k: metrics[k] for k in keep if k in metrics}
    headline["recall"] = {name: row["recall"] for name, row in metrics.get("per_class", {}).items()}
    return headline


def malignant_probability(
    probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str]
) -> np.ndarray:
    """P(malignant) = sum of the malignant classes' probabilities."""
    unknown = sorted(set(malignant_classes) - set(class_names))
    if unknown:
        raise ValueError(f"malignant classes {unknown} are not among the model's classes {list(class_names)}")
    columns = [list(class_names).index(c) for c in malignant_classes]
    return probs[:, columns].sum(axis=1)


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among ROC points whose specificity is at least `specificity`."""
    fpr, tpr, _ = roc_curve(y_true, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            bins.append(
                {
                    "low": low,
                    "high": high,
                    "count": int(in_bin.sum()),
                    "accuracy": float(correct[in_bin].mean()),
                    "confidence": float(confidence[in_bin].mean()),
                }
            )
    return bins


def macro_ovr_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have both positives and negatives."""
    aucs = [
        roc_auc_score(y_true == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y_true == c).sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def choose_operating_threshold(
    y_malignant: np.ndarray, p_malignant: np.ndarray, target_sensitivity: float = 0.9
) -> dict[str, float]:
    """The highest threshold on P(malignant) whose sensitivity reaches the target (referral rule: p >= t)."""
    y = np.asarray(y_malignant).astype(bool)
    p = np.asarray(p_malignant, dtype=np.float64)
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError("choosing an operating threshold needs both malignant and benign validation images")
    best = None
    for t in np.unique(p)[::-1]:
        sensitivity = float((p[y] >= t).mean())
        if sensitivity >= target_sensitivity:
            best = float(t)
            break
    if best is None:
        best = float(p.min())
    predicted = p >= best
    return {
        "threshold": best,
        "target_sensitivity": target_sensitivity,
        "sensitivity": float(predicted[y].mean()),
        "specificity": float((~predicted[~y]).mean()),
    }


def referral_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant: Sequence[str],
    target_sensitivity: float,
) -> dict[str, float] | None:
    """The referral threshold on P(malignant) chosen on (calibrated) validation probabilities for the target
    sensitivity; None when no malignant class is known or the split lacks malignant or benign images."""
    present = [c for c in malignant if c in class_names]
    if not present:
        return None
    y_mal = np.isin(np.asarray(class_names)[np.asarray(labels)], present)
    if y_mal.all() or not y_mal.any():
        log.warning("validation split lacks malignant or benign images; no operating threshold chosen")
        return None
    return choose_operating_threshold(y_mal, malignant_probability(probs, class_names, present), target_sensitivity)


_BOOTSTRAP_CHUNK = 250  # resamples scored at once: memory grows with chunk x cases, not with n_boot x cases


def _bootstrap_chunks(y_true: np.ndarray, n_boot: int, seed: int):
    """Yield (chunk, N) index arrays of a stratified bootstrap; see `stratified_bootstrap_indices`."""
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; a bootstrap needs at least 1 resample")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    for start in range(0, n_boot, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_boot - start)
        idx = np.empty((size, len(y_true)), dtype=np.int64)
        for rows in members:
            idx[:, rows] = rows[rng.integers(0, len(rows), size=(size, len(rows)))]
        yield idx


def stratified_bootstrap_indices(y_true: Sequence[int], n_boot: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n_boot, N) case indices of a bootstrap stratified by class: each resample draws, with replacement, as many
    cases of every class as it has, into that class's own positions, so `y_true[idx] == y_true` on every row and no
    resample loses a rare class."""
    return np.concatenate(list(_bootstrap_chunks(np.asarray(y_true), n_boot, seed)))


class _ResampleScorer:
    """Balanced accuracy, malignant AUC, per-class recall and sensitivity/specificity at a threshold of one set of
    predictions, on many resamples at once (vectorised; labels are fixed because the resampling is stratified)."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                 malignant_classes: Sequence[str], operating_threshold: float | None = None) -> None:
        self.correct = probs.argmax(axis=1) == y_true
        self.classes = {name: np.flatnonzero(y_true == c) for c, name in enumerate(class_names)
                        if (y_true == c).any()}
        present = [c for c in malignant_classes if c in class_names]
        y_mal = np.isin(np.asarray(class_names)[y_true], present) if present else np.zeros(len(y_true), bool)
        self.positives, self.negatives = np.flatnonzero(y_mal), np.flatnonzero(~y_mal)
        self.has_auc = bool(present) and len(self.positives) > 0 and len(self.negatives) > 0
        self.p_mal = malignant_probability(probs, class_names, present) if present else None
        self.referred = (self.p_mal >= operating_threshold) if (
            self.has_auc and operating_threshold is not None) else None

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        from scipy.stats import rankdata

        recall = {name: self.correct[idx[:, rows]].mean(axis=1) for name, rows in self.classes.items()}
        scores = {"balanced_accuracy": np.mean(list(recall.values()), axis=0),
                  **{f"recall/{name}": r for name, r in recall.items()}}
        if self.has_auc:
            # Mann-Whitney form of the ROC AUC, ties counted half: (rank sum of positives - P(P+1)/2) / (P N).
            ranks = rankdata(self.p_mal[idx], axis=1)
            n_pos, n_neg = len(self.positives), len(self.negatives)
            scores["malignant_auc"] = (ranks[:, self.positives].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            if self.referred is not None:
                scores["sensitivity_at_threshold"] = self.referred[idx[:, self.positives]].mean(axis=1)
                scores["specificity_at_threshold"] = (~self.referred[idx[:, self.negatives]]).mean(axis=1)
        return scores


def _resampled(scorers: Sequence[_ResampleScorer], y_true: np.ndarray, n_boot: int, seed: int
               ) -> list[dict[str, np.ndarray]]:
    """Each scorer's scores on the same stratified resamples, concatenated over chunks."""
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in scorers]
    for idx in _bootstrap_chunks(y_true, n_boot, seed):
        for part, scorer in zip(parts, scorers):
            part.append(scorer(idx))
    return [{key: np.concatenate([chunk[key] for chunk in part]) for key in part[0]} for part in parts]


def _interval(values: np.ndarray, confidence: float) -> dict[str, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


def _check_bootstrap_inputs(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
                            confidence: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y), len(class_names)):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y)}, {len(class_names)})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}; expected a fraction in (0, 1), e.g. 0.95")
    if len(y) == 0:
        raise ValueError("a bootstrap interval needs at least one case")
    return y, probs


def bootstrap_intervals(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    operating_threshold: float | None = None,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, Any] | None:
    """Percentile bootstrap intervals of balanced accuracy, malignant AUC, per-class recall and, with a threshold,
    sensitivity and specificity at it: the one interval computation every report uses.

    Resampling is stratified by class (each class keeps its count), so a rare class is never absent from a
    resample; with a fixed `seed` the intervals repeat exactly. `n_boot=0` gives None (no intervals). A class with
    very few cases gets a narrow but meaningless recall interval: read it together with the class's support.
    """
    if n_boot == 0:
        return None
    y, probs = _check_bootstrap_inputs(y_true, probs, class_names, confidence)
    (scores,) = _resampled([_ResampleScorer(y, probs, class_names, malignant_classes, operating_threshold)], y,
                           n_boot, seed)
    out: dict[str, Any] = {"method": "percentile bootstrap, stratified by class", "confidence": confidence,
                           "n_boot": int(n_boot), "seed": int(seed)}
    for key in ("balanced_accuracy", "malignant_auc", "sensitivity_at_threshold", "specificity_at_threshold"):
        if key in scores:
            out[key] = _interval(scores[key], confidence)
    out["recall"] = {key.split("/", 1)[1]: _interval(values, confidence)
                     for key, values in scores.items() if key.startswith("recall/")}
    return out


def paired_bootstrap_delta(
    y_true: Sequence[int],
    probs_ref: np.ndarray,
    probs_new: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Change (new - reference) in balanced accuracy and malignant AUC with a paired bootstrap interval.

    Both models are scored on the same resampled cases (stratified by class, as in `bootstrap_intervals`), so the
    interval reflects the difference between them, not each model's own sampling noise. `probs_new` may also be
    (runs, cases, classes), e.g. one model trained with several seeds: the change is then the mean over runs of
    each run's change, on every resample.
    """
    y, probs_ref = _check_bootstrap_inputs(y_true, probs_ref, class_names, confidence)
    probs_new = np.asarray(probs_new, dtype=np.float64)
    runs_new = probs_new[None] if probs_new.ndim == 2 else probs_new
    if runs_new.ndim != 3 or runs_new.shape[1:] != probs_ref.shape:
        raise ValueError(f"probabilities of shapes {probs_ref.shape} and {probs_new.shape} do not both cover the "
                         f"{len(y)} cases")
    reference = _ResampleScorer(y, probs_ref, class_names, malignant_classes)
    if not reference.has_auc:
        raise ValueError(f"a paired comparison needs malignant ({list(malignant_classes)}) and benign cases; the "
                         f"{len(y)} cases lack one of them")
    scorers = [reference, *(_ResampleScorer(y, run, class_names, malignant_classes) for run in runs_new)]
    identity = np.arange(len(y))[None]
    points = [scorer(identity) for scorer in scorers]
    resampled = _resampled(scorers, y, n_boot, seed)
    out = {}
    for key in ("balanced_accuracy", "malignant_auc"):
        point = float(np.mean([p[key][0] for p in points[1:]]) - points[0][key][0])
        deltas = np.mean([r[key] for r in resampled[1:]], axis=0) - resampled[0][key]
        out[key] = {"delta": point, **_interval(deltas, confidence)}
    return out


def add_score_intervals(scores: Any, class_names: Sequence[str], malignant_classes: Sequence[str],
                        n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Any:
    """Attach `bootstrap_intervals` to a `CalibratedScores`' validation and test metrics (in place), so that the
    card (`scores.card_metrics()`) and the report carry them; returns `scores`."""
    threshold = scores.threshold["threshold"] if scores.threshold else None
    pairs = [(scores.val_metrics, scores.val_labels, scores.val_probs)]
    if scores.test_metrics is not None:
        pairs.append((scores.test_metrics, scores.test_labels, scores.test_probs))
    for metrics, labels, probs in pairs:
        intervals = bootstrap_intervals(labels, probs, class_names, malignant_classes, threshold, n_boot, seed)
        if intervals is not None:
            metrics["intervals"] = intervals
    return scores


# --------------------------------------------------------------------------------------------------------------------
# Bundles derived from other bundles, and images a bundle was trained on


def bundle_sha256(bundle_dir: str | Path) -> str:
    """SHA-256 of a bundle's weights file; for an ensemble, of its members' hashes in order."""
    import hashlib

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


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[str] = ("mel", "bcc", "akiec"),
    operating_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number the report shows, from labels and predicted class probabilities."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true) or probs.shape[1] != len(class_names):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y_true)}, {len(class_names)})")
    pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_auc": macro_ovr_auc(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
    present = [c for c in malignant_classes if c in class_names]
    if present:
        y_mal = np.isin(np.asarray(class_names)[y_true], present)
        p_mal = malignant_probability(probs, class_names, present)
        if 0 < y_mal.sum() < len(y_mal):
            metrics["malignant_auc"] = float(roc_auc_score(y_mal, p_mal))
            metrics["sensitivity_at_80_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.80)
            metrics["sensitivity_at_90_specificity"] = sensitivity_at_specificity(y_mal, p_mal, 0.90)
            if operating_threshold is not None:
                referred = p_mal >= operating_threshold
                metrics["at_operating_threshold"] = {
                    "threshold": float(operating_threshold),
                    "sensitivity": float(referred[y_mal].mean()),
                    "specificity": float((~referred[~y_mal]).mean()),
                }
    return metrics


def save_plots(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str], out_dir: Path
) -> list[str]:
    """ROC curves, confusion matrix and reliability diagram as PNG files; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    y_true = np.asarray(y_true)

    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        if 0 < (y_true == c).sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
            ax.plot(fpr, tpr, lw=1, label=f"{name} (AUC {roc_auc_score(y_true == c, probs[:, c]):.2f})")
    present = [c for c in malignant_classes if c in class_names]
    y_mal = np.isin(np.asarray(class_names)[y_true], present)
    if present and 0 < y_mal.sum() < len(y_mal):
        p_mal = malignant_probability(probs, class_names, present)
        fpr, tpr, _ = roc_curve(y_mal, p_mal)
        ax.plot(fpr, tpr, "k", lw=2.5, label=f"malignant (AUC {roc_auc_score(y_mal, p_mal):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=120)
    plt.close(fig)
    written.append("roc.png")

    cm = confusion_matrix(y_true, probs.argmax(1), labels=list(range(len(class_names))))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised colour)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=120)
    plt.close(fig)
    written.append("confusion_matrix.png")

    bins = reliability_bins(y_true, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="k")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        title=f"Reliability (ECE {expected_calibration_error(y_true, probs):.3f})",
    )
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=120)
    plt.close(fig)
    written.append("reliability.png")
    return written


def save_reliability_comparison(
    y_true: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path, what: str = "test split"
) -> Path:
    """Reliability diagrams before and after calibration, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharey=True)
    for ax, probs, title in zip(axes, (before, after), ("before calibration", "after calibration")):
        bins = reliability_bins(y_true, probs)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7,
               edgecolor="k")
        ax.set(xlabel="confidence", title=f"{title} (ECE {expected_calibration_error(y_true, probs):.3f})",
               xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"Reliability on the {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interval_text(interval: dict[str, float] | None, digits: int = 3) -> str:
    """' [low, high]' for a report line; '' when there is no interval."""
    if not interval:
        return ""
    return f" [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def training_overlap_lines(overlap: dict[str, Any] | None) -> list[str]:
    """The report's leakage line: a loud warning when scored images were training images, else what was checked."""
    if not overlap:
        return []
    what, manifest = overlap.get("what", "evaluated"), Path(overlap["training_manifest"]).name
    if overlap["training_images"]:
        return [f"> **Warning: {overlap['training_images']} of the {overlap['checked']} {what} images were used to "
                f"train this bundle** (the `train` rows of its training manifest `{manifest}`). The numbers below "
                "overstate how well it does on new images; score it on its held-out test split instead.", ""]
    return [f"None of the {overlap['checked']} {what} images is a training image of this bundle (checked against "
            f"its training manifest `{manifest}`).", ""]


def write_report(
    metrics: dict[str, Any], out_dir: str | Path, title: str = "Evaluation", extra: dict | None = None
) -> Path:
    """Write `report.json` and a readable `report.md` into `out_dir`.

    `metrics["intervals"]` (from `bootstrap_intervals`) puts a 95 % interval next to balanced accuracy, malignant
    AUC, the sensitivity at the threshold and each class's recall; `extra["training_overlap"]` (from
    `check_training_overlap`) puts the leakage warning at the top.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": metrics, **(extra or {})}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=float))
    intervals = metrics.get("intervals") or {}
    lines = [f"# {title}", "", *training_overlap_lines((extra or {}).get("training_overlap"))]
    for key in HEADLINE_METRICS:
        if key in metrics:
            value = metrics[key]
            lines.append(
                f"- **{key.replace('_', ' ')}**: {value:.4f}{interval_text(intervals.get(key))}"
                if isinstance(value, float) else f"- **{key}**: {value}"
            )
    if "at_operating_threshold" in metrics:
        op = metrics["at_operating_threshold"]
        lines.append(
            f"- **operating threshold** {op['threshold']:.4f} (chosen on validation): sensitivity "
            f"{op['sensitivity']:.3f}{interval_text(intervals.get('sensitivity_at_threshold'))}, specificity "
            f"{op['specificity']:.3f}{interval_text(intervals.get('specificity_at_threshold'))}"
        )
    recall_ci = intervals.get("recall") or {}
    head = "| class | precision | recall | F1 | support |" + (" recall 95 % interval |" if recall_ci else "")
    lines += ["", head, "|---|---|---|---|---|" + ("---|" if recall_ci else "")]
    for name, row in metrics.get("per_class", {}).items():
        line = f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
        if recall_ci:
            line += f"{interval_text(recall_ci.get(name)) or ' n/a'} |"
        lines.append(line)
    if intervals:
        lines += ["", f"[low, high]: {100 * intervals['confidence']:.0f} % {intervals['method']} "
                  f"({intervals['n_boot']} resamples, seed {intervals['seed']}); a class with few images has a "
                  "narrow interval that means little."]
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and key == "data":
            lines += ["", "## Data", "", "| class | real | synthetic |", "|---|---|---|"]
            for name, counts in value.get("train_counts", {}).items():
                lines.append(f"| {name} | {counts.get('real', 0)} | {counts.get('synthetic', 0)} |")
    calibration = (extra or {}).get("calibration")
    if calibration and "ece_before" in calibration:
        lines += ["", "## Calibration", "",
                  f"{calibration['method']} scaling fitted on the {calibration['fitted_on']}"
                  + (f": temperature {calibration['temperature']:.3f}" if "temperature" in calibration else "")
                  + f"; validation ECE {calibration['ece_before']:.3f} → {calibration['ece_after']:.3f}, NLL "
                  f"{calibration['nll_before']:.3f} → {calibration['nll_after']:.3f}."]
        if "ece_uncalibrated" in metrics:
            lines.append(f"On this split: ECE {metrics['ece_uncalibrated']:.3f} before, {metrics['ece']:.3f} after.")
    for png in ("roc.png", "confusion_matrix.png", "reliability.png", "reliability_calibration.png"):
        if (out_dir / png).is_file():
            lines += ["", f"![{png[:-4]}]({png})"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.md"


def evaluate_bundle(
    bundle_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    split: str | None = "test",
    tta: int | None = None,
    n_boot: int = BOOTSTRAP_RESAMPLES,
    engine: str = "auto",
) -> dict:
    """Evaluate a saved bundle on a manifest (its `split` rows, or all rows) or a dataset folder; write the report.

    Probabilities are the bundle's calibrated ones, with its own test-time augmentation unless `tta` overrides it.
    The report gives 95 % bootstrap intervals (`n_boot` resamples; 0: none) and warns when evaluated images were
    training images of the bundle (`check_training_overlap`); the returned metrics carry the same `intervals`.
    """
    import pandas as pd

    from pipelines.images import ImageError, load_image
    from pipelines.manifest import ingest_class_folders, ingest_ham10000, read_manifest
    from pipelines.prediction import Predictor

    data = Path(data)
    if data.is_file():
        manifest = read_manifest(data)
        if split and (manifest.split == split).any():
            manifest = manifest[manifest.split == split]
    elif (data / "metadata.csv").is_file():
        manifest = ingest_ham10000(data)
    elif data.is_dir():
        manifest = ingest_class_folders(data)
    else:
        raise FileNotFoundError(f"evaluation data '{data}' is neither a manifest CSV nor a dataset folder")
    manifest = manifest.reset_index(drop=True)
    predictor = Predictor.from_path(bundle_dir, tta=tta, engine=engine)
    unknown = sorted(set(manifest.label) - set(predictor.class_names))
    if unknown:
        raise ValueError(
            f"data has labels {unknown} that bundle '{bundle_dir}' does not know ({predictor.class_names})"
        )
    card = predictor.bundle.card
    overlap = check_training_overlap(bundle_dir, card, manifest, "evaluated", [data] if data.is_file() else [])
    images, kept, errors = [], [], []
    for i, path in enumerate(manifest.path):
        try:
            images.append(load_image(path, predictor.limits))
            kept.append(i)
        except ImageError as err:
            log.warning("skipped: %s", err)
            errors.append(err)
    rows = manifest.iloc[kept]
    probs = predictor.predict(images).astype(np.float64)
    table = predictor.table(rows.image_id.astype(str).tolist(), probs)
    y_true = np.array([predictor.class_names.index(label) for label in rows.label], dtype=np.int64)
    malignant, threshold = predictor.bundle.malignant_classes, predictor.bundle.operating_threshold
    metrics = compute_metrics(y_true, probs, predictor.class_names, malignant, threshold)
    if len(y_true):
        intervals = bootstrap_intervals(y_true, probs, predictor.class_names, malignant, threshold, n_boot)
        if intervals is not None:
            metrics["intervals"] = intervals
    out_dir = Path(out_dir)
    save_plots(y_true, probs, predictor.class_names, malignant, out_dir)
    write_report(
        metrics, out_dir, f"Evaluation of {bundle_dir} on {data}",
        {"skipped_images": [str(e) for e in errors], "tta": predictor.tta, "training_overlap": overlap,
         "calibration": card.get("calibration")},
    )
    pd.DataFrame(table).to_csv(out_dir / "predictions.csv", index=False)
    return metrics
