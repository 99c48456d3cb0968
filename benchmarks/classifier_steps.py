"""Separate 224 px, EMA, colour constancy and TTA: one row per step, same seed, same 855 test images.

    python benchmarks/classifier_steps.py --nocc-run runs/bench_nocc --shipped models/default_bundle \
        --baseline runs/old_default_bundle --out benchmarks/results/classifier_ablation/steps \
        --baseline-train-minutes 50

`--nocc-run` is a finished `benchmarks/train_ham10000.py --color-constancy none` run with the shipped bundle's
training seed and schedule; its `checkpoints/best_raw.safetensors` holds the raw weights of the epoch that the
EMA's validation picked, so the EMA row and the row before it differ in the averaging only. `--shipped` is the
shipped bundle (the same recipe with colour constancy), `--baseline` the previous recipe's bundle; all three must
have been trained on the same manifest (hash checked). Rows build on each other; temperature and referral
threshold are fitted on validation; each row's change against the first carries a 95 % paired bootstrap interval.
The last row, colour constancy removed from the TTA recipe, measures colour constancy once more with 8 views.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classifier_ablation import Arm, _latency_ms, _logits_of, ablation_table, score_arms  # noqa: E402

from models.bundle import load_bundle, save_bundle  # noqa: E402
from pipelines.data import ImageDataset  # noqa: E402
from pipelines.manifest import manifest_sha256, read_manifest  # noqa: E402
from pipelines.training import BEST_RAW_FILE  # noqa: E402
from pipelines.transforms import card_transform  # noqa: E402

log = logging.getLogger("classifier_steps")


def _card(bundle_dir: Path, manifest_hash: str, what: str) -> dict:
    card = json.loads((bundle_dir / "card.json").read_text())
    if card.get("manifest_sha256") != manifest_hash:
        raise SystemExit(f"{what} '{bundle_dir}' was trained on another manifest than the --nocc-run's")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nocc-run", type=Path, required=True,
                        help="a finished benchmarks/train_ham10000.py run with --color-constancy none")
    parser.add_argument("--shipped", type=Path, default=Path("models/default_bundle"))
    parser.add_argument("--baseline", type=Path, required=True, help="bundle of the previous recipe, same split")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/classifier_ablation/steps"))
    parser.add_argument("--work", type=Path, default=Path("runs/classifier_steps"),
                        help="scratch folder for the intermediate bundle (not part of the record)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--baseline-train-minutes", type=float, default=float("nan"),
                        help="the baseline's training time, when its card does not record it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    manifest_path = args.nocc_run / "manifest.csv"
    manifest_hash = manifest_sha256(manifest_path)
    nocc_dir = args.nocc_run / "bundle"
    nocc_card = _card(nocc_dir, manifest_hash, "--nocc-run bundle")
    shipped_card = _card(args.shipped, manifest_hash, "--shipped")
    baseline_card = _card(args.baseline, manifest_hash, "--baseline")
    cc = {name: (card.get("preprocessing") or {}).get("color_constancy") or "none"
          for name, card in (("nocc", nocc_card), ("shipped", shipped_card))}
    if cc != {"nocc": "none", "shipped": "shades_of_gray"}:
        raise SystemExit(f"expected a run without and a bundle with colour constancy, got {cc}")
    same = {"architecture": lambda c: c.get("architecture"), "input_size": lambda c: c.get("input_size"),
            "class_names": lambda c: c.get("class_names"), "training seed": lambda c: c["training"].get("seed"),
            "epochs": lambda c: c["training"].get("epochs_run")}
    for key, get in same.items():
        if get(nocc_card) != get(shipped_card):
            raise SystemExit(f"--nocc-run and --shipped differ in {key}: {get(nocc_card)} vs {get(shipped_card)}")
    best_raw = args.nocc_run / "checkpoints" / BEST_RAW_FILE
    if not best_raw.is_file():
        raise SystemExit(f"'{best_raw}' is missing: the run predates raw weights saved at the selected epoch")

    manifest = read_manifest(manifest_path)
    class_names, malignant = shipped_card["class_names"], shipped_card["malignant_classes"]
    train = manifest[manifest.split == "train"]
    priors = np.array([(train.label == c).mean() for c in class_names])
    rows = {split: manifest[(manifest.split == split) & (manifest.source == "real")] for split in ("val", "test")}

    def datasets(card: dict) -> tuple[ImageDataset, ImageDataset]:
        transform = card_transform(card)
        return ImageDataset(rows["val"], class_names, transform), ImageDataset(rows["test"], class_names, transform)

    saved = np.load(args.nocc_run / "report" / "logits.npz")
    val_labels, test_labels = saved["val_labels"], saved["test_labels"]
    nocc_v, nocc_t = saved["val_logits"], saved["test_logits"]
    base_v, base_t = _logits_of(args.baseline, *datasets(baseline_card), 1)
    raw_dir = args.work / "nocc_best_raw"
    raw_model = load_bundle(nocc_dir).model
    raw_model.load_state_dict(load_file(best_raw))
    save_bundle(raw_dir, raw_model, {k: v for k, v in nocc_card.items() if k not in ("format_version", "versions")})
    raw_v, raw_t = _logits_of(raw_dir, *datasets(nocc_card), 1)
    ship_v, ship_t = _logits_of(args.shipped, *datasets(shipped_card), 8)

    nocc_minutes = nocc_card.get("training", {}).get("train_minutes", float("nan"))
    ship_minutes = shipped_card.get("training", {}).get("train_minutes", float("nan"))
    base_minutes = baseline_card.get("training", {}).get("train_minutes", args.baseline_train_minutes)
    epoch = nocc_card.get("training", {}).get("best_epoch")
    sample = [Image.open(p).convert("RGB") for p in rows["test"].path.head(23)]
    arms = [
        Arm("previous recipe (160 px, 6 epochs, no EMA, no colour constancy, 1 view)", base_v, base_t,
            train_minutes=base_minutes, latency_ms=_latency_ms(args.baseline, sample, 1)),
        Arm(f"+ 224 px, 12-epoch schedule (raw weights of epoch {epoch}, the epoch the EMA's validation picked; "
            "1 view)", raw_v, raw_t, train_minutes=nocc_minutes, latency_ms=_latency_ms(raw_dir, sample, 1)),
        Arm(f"+ EMA of the weights (epoch {epoch}, 1 view)", nocc_v, nocc_t, train_minutes=nocc_minutes,
            latency_ms=_latency_ms(nocc_dir, sample, 1)),
        Arm("+ colour constancy (the shipped network, 1 view)", ship_v, ship_t, train_minutes=ship_minutes,
            latency_ms=_latency_ms(args.shipped, sample, 1)),
        Arm("+ TTA, 8 views (the shipped bundle)", ship_v, ship_t, views=8, train_minutes=ship_minutes,
            latency_ms=_latency_ms(args.shipped, sample, 8)),
        Arm("shipped recipe without colour constancy (EMA, 8 views)", nocc_v, nocc_t, views=8,
            train_minutes=nocc_minutes, latency_ms=_latency_ms(nocc_dir, sample, 8)),
    ]
    records = score_arms(arms, val_labels, test_labels, class_names, malignant, priors, args.bootstrap)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "study": "classifier_ablation/steps",
        "date": datetime.date.today().isoformat(),
        "protocol": "HAM10000 (5,984 images, one per lesion), grouped 70/15/15 split by lesion_id, seed 0; "
                    "training seed 0 for every network; every row scored on the same 855 test images; "
                    "temperature and referral threshold fitted on the 855 validation images; 95 % paired "
                    "bootstrap (resampling test images) against the first row",
        "command": "python benchmarks/classifier_steps.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "training_command": json.loads((args.nocc_run / "benchmark.json").read_text()).get("command"),
        "selected_epoch": {"nocc": epoch, "shipped": shipped_card.get("training", {}).get("best_epoch")},
        "test_n": int(len(test_labels)), "val_n": int(len(val_labels)),
        "rows": records,
    }
    (args.out / "steps.json").write_text(json.dumps(record, indent=2, default=float))
    text = ablation_table(records)
    print(text)
    (args.out / "steps.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
