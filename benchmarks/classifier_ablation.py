"""Which parts of the classifier recipe help: one table over the same held-out test images, paired intervals.

    python benchmarks/classifier_ablation.py --run runs/bench_default --baseline runs/old_default_bundle \
        --out benchmarks/results/classifier_ablation

`--run` is a finished `benchmarks/train_ham10000.py` run (its `report/logits.npz` holds the shipped network's
8-view logits on validation and test, `checkpoints/last_raw.safetensors` the raw weights behind the EMA).
`--baseline` is a bundle of the previous recipe trained on the same split (its manifest hash must match).
Rows build on each other; every choice a row makes (temperature, logit-adjustment τ) is fitted on validation.
Each row's change against the first row carries a 95 % paired bootstrap interval on the test images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

from models.bundle import load_bundle, save_bundle
from pipelines.calibration import calibrated_probs, fit_calibration
from pipelines.data import ImageDataset
from pipelines.evaluation import compute_metrics, paired_bootstrap_delta, referral_threshold
from pipelines.manifest import manifest_sha256, read_manifest
from pipelines.prediction import Predictor, combine_members, dataset_logits
from pipelines.transforms import card_transform

log = logging.getLogger("classifier_ablation")
ENSEMBLE_RULE = "both TTA, calibrated, one temperature on the mean"  # as `lesionlab ensemble` ships it


@dataclass
class Arm:
    """One row: validation and test logits (N, V, C) of some network, and how its probabilities are formed."""

    name: str
    val_logits: np.ndarray
    test_logits: np.ndarray
    views: int = 1
    calibrate: bool = True
    prior_tau: float = 0.0  # post-hoc logit adjustment: log p − τ log prior (Menon et al. 2021)
    members: tuple["Arm", ...] = ()
    train_minutes: float = float("nan")
    latency_ms: float = float("nan")
    calibration: dict | None = None

    def probs(self, split: str, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, uncalibrated) probabilities on a split."""
        if self.members:  # as `lesionlab ensemble` ships it: the members' calibrated mean, then one temperature
            pairs = [m.probs(split, priors) for m in self.members]
            return (combine_members([p[0] for p in pairs], self.calibration),
                    np.mean([p[1] for p in pairs], axis=0))
        logits = (self.val_logits if split == "val" else self.test_logits)[:, : self.views]
        logits = logits - self.prior_tau * np.log(priors)
        return calibrated_probs(logits, self.calibration), calibrated_probs(logits, None)

    def fit(self, val_labels: np.ndarray) -> None:
        """Fit the temperature on validation (members fit their own)."""
        for member in self.members:
            member.fit(val_labels)
        if self.members and self.calibrate:
            mean = np.mean([m.probs("val", self.priors)[0] for m in self.members], axis=0)
            self.calibration = fit_calibration(np.log(np.clip(mean, 1e-12, None)), val_labels)
        if not self.members and self.calibrate:
            self.calibration = fit_calibration(self.val_logits[:, : self.views] - self.prior_tau * np.log(self.priors),
                                               val_labels)

    priors: np.ndarray = None  # type: ignore[assignment]


def _logits_of(bundle_dir: Path, val_ds: ImageDataset, test_ds: ImageDataset, views: int) -> tuple:
    model = load_bundle(bundle_dir).model
    val, _ = dataset_logits(model, val_ds, views)
    test, _ = dataset_logits(model, test_ds, views)
    return val, test


def _latency_ms(bundle_dir: Path, images: list[Image.Image], tta: int, runs: int = 20) -> float:
    predictor = Predictor.from_path(bundle_dir, tta=tta)
    for image in images[:3]:
        predictor.predict([image])
    timings = []
    for i in range(runs):
        started = time.perf_counter()
        predictor.predict([images[i % len(images)]])
        timings.append(1000 * (time.perf_counter() - started))
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished benchmarks/train_ham10000.py run")
    parser.add_argument("--baseline", type=Path, required=True, help="bundle of the previous recipe, same split")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/classifier_ablation"))
    parser.add_argument("--work", type=Path, default=Path("runs/classifier_ablation"),
                        help="scratch folder for the intermediate bundles (not part of the record)")
    parser.add_argument("--smote", action="store_true", help="add the feature-space SMOTE head row (slow)")
    parser.add_argument("--seed-member", type=Path, default=None,
                        help="a bundle of the same recipe trained with another seed on the same split: adds the "
                        "row 'ensemble of two seeds' (this run's bundle + that one, both TTA, calibrated)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--baseline-train-minutes", type=float, default=float("nan"),
                        help="the baseline's training time, when its card does not record it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    manifest_path = args.run / "manifest.csv"
    bench = json.loads((args.run / "benchmark.json").read_text())
    baseline_card = json.loads((args.baseline / "card.json").read_text())
    if baseline_card.get("manifest_sha256") != manifest_sha256(manifest_path):
        raise SystemExit(f"baseline '{args.baseline}' was trained on another manifest than '{manifest_path}'")
    manifest = read_manifest(manifest_path)
    bundle_dir = args.run / "bundle"
    card = json.loads((bundle_dir / "card.json").read_text())
    class_names, malignant = card["class_names"], card["malignant_classes"]
    train = manifest[manifest.split == "train"]
    priors = np.array([(train.label == c).mean() for c in class_names])
    saved = np.load(args.run / "report" / "logits.npz")
    val_labels, test_labels = saved["val_labels"], saved["test_labels"]

    # The previous recipe: its own preprocessing, no TTA, trained once on the same split.
    rows = {split: manifest[(manifest.split == split) & (manifest.source == "real")] for split in ("val", "test")}
    base_tf = card_transform(baseline_card)
    # 8 views once; view 0 of the dihedral group is the plain crop, so [:, :1] is the one-view row.
    base_val, base_test = _logits_of(args.baseline, ImageDataset(rows["val"], class_names, base_tf),
                                     ImageDataset(rows["test"], class_names, base_tf), 8)
    # The new recipe's raw weights (no EMA), one view.
    raw_dir = args.work / "raw_bundle"
    raw_model = load_bundle(bundle_dir).model
    raw_model.load_state_dict(load_file(args.run / "checkpoints" / "last_raw.safetensors"))
    save_bundle(raw_dir, raw_model, {k: v for k, v in card.items() if k not in ("format_version", "versions")})
    new_tf = card_transform(card)
    raw_val, raw_test = _logits_of(raw_dir, ImageDataset(rows["val"], class_names, new_tf),
                                   ImageDataset(rows["test"], class_names, new_tf), 1)

    ema_v, ema_t = saved["val_logits"], saved["test_logits"]
    train_minutes = bench.get("train_minutes", float("nan"))
    baseline_minutes = baseline_card.get("training", {}).get("train_minutes", args.baseline_train_minutes)
    arms = [
        Arm("previous recipe (160 px, no EMA, no colour constancy, 1 view)", base_val, base_test,
            train_minutes=baseline_minutes),
        Arm("new recipe, raw weights (224 px, colour constancy, 1 view)", raw_val, raw_test,
            train_minutes=train_minutes),
        Arm("+ EMA of the weights", ema_v, ema_t, train_minutes=train_minutes),
        Arm("+ TTA (8 dihedral views)", ema_v, ema_t, views=8, train_minutes=train_minutes),
    ]
    # Post-hoc logit adjustment on top of the shipped recipe: τ chosen on validation balanced accuracy.
    best_tau, best_score = 0.0, -1.0
    for tau in np.round(np.arange(0.0, 1.01, 0.1), 2):
        probe = Arm("probe", ema_v, ema_t, views=8, prior_tau=float(tau))
        probe.priors = priors
        probe.fit(val_labels)
        score = compute_metrics(val_labels, probe.probs("val", priors)[0], class_names, malignant)["balanced_accuracy"]
        if score > best_score + 1e-9:
            best_tau, best_score = float(tau), score
    arms.append(Arm(f"+ logit adjustment (τ = {best_tau:.1f}, chosen on validation)", ema_v, ema_t, views=8,
                    prior_tau=best_tau, train_minutes=train_minutes))
    if args.smote:
        from pipelines.balancing import BalancingConfig, balance_bundle

        smote_dir = args.work / "smote_bundle"
        started = time.perf_counter()
        balance_bundle(bundle_dir, manifest_path, smote_dir, BalancingConfig(method="smote"),
                       card["threshold_metrics"]["target_sensitivity"], args.work / "smote_report")
        smote_minutes = (time.perf_counter() - started) / 60
        smote = np.load(args.work / "smote_report" / "logits.npz")
        arms.append(Arm("+ feature-space SMOTE head (on the TTA recipe)", smote["val_logits"], smote["test_logits"],
                        views=8, train_minutes=train_minutes + smote_minutes))
    old_tta = Arm("previous bundle with TTA", base_val, base_test, views=8)
    arms.append(Arm(f"ensemble: shipped recipe + previous bundle ({ENSEMBLE_RULE})", ema_v, ema_t,
                    members=(Arm("new", ema_v, ema_t, views=8), old_tta),
                    train_minutes=train_minutes + baseline_minutes))

    if args.seed_member is not None:
        member_card = json.loads((args.seed_member / "card.json").read_text())
        if member_card.get("manifest_sha256") != manifest_sha256(manifest_path):
            raise SystemExit(f"--seed-member '{args.seed_member}' was trained on another manifest than "
                             f"'{manifest_path}'")
        member_tf = card_transform(member_card)
        seed_v, seed_t = _logits_of(args.seed_member, ImageDataset(rows["val"], class_names, member_tf),
                                    ImageDataset(rows["test"], class_names, member_tf), 8)
        member_minutes = member_card.get("training", {}).get("train_minutes", float("nan"))
        arms.append(Arm(f"ensemble of two seeds: this run + {args.seed_member.name} ({ENSEMBLE_RULE})",
                        ema_v, ema_t, members=(Arm("new", ema_v, ema_t, views=8), Arm("seed", seed_v, seed_t,
                                                                                    views=8)),
                        train_minutes=train_minutes + member_minutes))
    sample = [Image.open(p).convert("RGB") for p in rows["test"].path.head(23)]
    latency = {("base", 1): _latency_ms(args.baseline, sample, 1), ("new", 1): _latency_ms(bundle_dir, sample, 1),
               ("new", 8): _latency_ms(bundle_dir, sample, 8), ("base", 8): _latency_ms(args.baseline, sample, 8)}

    for i, arm in enumerate(arms):
        if arm.members and arm.name.startswith("ensemble of two seeds"):
            arm.latency_ms = 2 * latency[("new", 8)]
        elif arm.members:
            arm.latency_ms = latency[("new", 8)] + latency[("base", 8)]
        else:
            arm.latency_ms = latency[("base", 1)] if i == 0 else latency[("new", arm.views)]
    records = score_arms(arms, val_labels, test_labels, class_names, malignant, priors, args.bootstrap)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "study": "classifier_ablation",
        "date": datetime.date.today().isoformat(),
        "protocol": "HAM10000 (5,984 images, one per lesion), grouped 70/15/15 split by lesion_id, seed 0; every "
                    "row scored on the same 855 test images; temperature, τ and referral threshold fitted on the "
                    "855 validation images; 95 % paired bootstrap against the first row",
        "command": "python benchmarks/classifier_ablation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else (f"--{k}" if v else "")
            for k, v in vars(args).items()).strip(),
        "training_command": bench.get("command"),
        "test_n": int(len(test_labels)), "val_n": int(len(val_labels)),
        "rows": records,
    }
    (args.out / "ablation.json").write_text(json.dumps(record, indent=2, default=float))
    text = ablation_table(records)
    print(text)
    (args.out / "ablation.md").write_text(text + "\n")


def score_arms(arms: list[Arm], val_labels: np.ndarray, test_labels: np.ndarray, class_names: list[str],
               malignant: list[str], priors: np.ndarray, n_boot: int) -> list[dict]:
    """Fit every row on validation, score it on test, and bootstrap its change against the first row."""
    for arm in arms:
        arm.priors = priors
        for member in arm.members:
            member.priors = priors
        arm.fit(val_labels)
    reference = arms[0].probs("test", priors)[0]
    records = []
    for i, arm in enumerate(arms):
        val_cal, _ = arm.probs("val", priors)
        test_cal, test_raw = arm.probs("test", priors)
        threshold = referral_threshold(val_labels, val_cal, class_names, malignant, 0.9)
        val_m = compute_metrics(val_labels, val_cal, class_names, malignant)
        test_m = compute_metrics(test_labels, test_cal, class_names, malignant, threshold["threshold"])
        raw_m = compute_metrics(test_labels, test_raw, class_names, malignant)
        delta = paired_bootstrap_delta(test_labels, reference, test_cal, class_names, malignant,
                                       n_boot=n_boot) if i else None
        records.append({
            "row": arm.name,
            "val_balanced_accuracy": val_m["balanced_accuracy"], "val_malignant_auc": val_m["malignant_auc"],
            "test_balanced_accuracy": test_m["balanced_accuracy"], "test_malignant_auc": test_m["malignant_auc"],
            "test_recall": {c: r["recall"] for c, r in test_m["per_class"].items()},
            "test_ece_uncalibrated": raw_m["ece"], "test_ece_calibrated": test_m["ece"],
            "test_at_threshold": test_m.get("at_operating_threshold"),
            "delta_vs_first_row": delta, "train_minutes": arm.train_minutes, "batch1_ms": arm.latency_ms,
        })
        log.info("%s: val BA %.3f AUC %.3f | test BA %.3f AUC %.3f mel %.2f ECE %.3f -> %.3f", arm.name,
                 val_m["balanced_accuracy"], val_m["malignant_auc"], test_m["balanced_accuracy"],
                 test_m["malignant_auc"], test_m["per_class"]["mel"]["recall"], raw_m["ece"], test_m["ece"])
    return records


def ablation_table(records: list[dict]) -> str:
    """The rows as a GitHub table: metrics, paired intervals against the first row, cost."""
    table = pd.DataFrame([{
        "row": r["row"], "val BA": r["val_balanced_accuracy"], "test BA": r["test_balanced_accuracy"],
        "test AUC": r["test_malignant_auc"], "mel recall": r["test_recall"]["mel"],
        "ECE before/after": f"{r['test_ece_uncalibrated']:.3f} / {r['test_ece_calibrated']:.3f}",
        "Δ BA": "" if r["delta_vs_first_row"] is None else
        "{delta:+.3f} [{low:+.3f}, {high:+.3f}]".format(**r["delta_vs_first_row"]["balanced_accuracy"]),
        "Δ AUC": "" if r["delta_vs_first_row"] is None else
        "{delta:+.3f} [{low:+.3f}, {high:+.3f}]".format(**r["delta_vs_first_row"]["malignant_auc"]),
        "train min": r["train_minutes"], "batch-1 ms": r["batch1_ms"],
    } for r in records])
    return markdown_table(table)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub table, floats to 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


if __name__ == "__main__":
    main()
