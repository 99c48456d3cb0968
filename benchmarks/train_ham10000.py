"""Train the default recipe on the full HAM10000 folder and report held-out test metrics and speed.

python benchmarks/train_ham10000.py --data ../shared/data/ham10000 --out runs/bench_ham10000
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipelines.config import RunConfig
from pipelines.run import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000 folder: metadata.csv + images/")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ham10000"))
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sampler", default="sqrt", choices=["none", "balanced", "sqrt"])
    parser.add_argument("--class-weighting", default="effective", choices=["none", "inverse", "effective"])
    parser.add_argument("--budget-minutes", type=float, default=55.0, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config = RunConfig.model_validate(
        {
            "run_dir": str(args.out),
            "data": {"format": "ham10000", "root": str(args.data)},
            "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": args.seed},
            "model": {"name": args.model, "img_size": args.img_size, "pretrained": True},
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_epochs": 1,
                "patience": 4,
                "sampler": args.sampler,
                "class_weighting": args.class_weighting,
                "time_budget_minutes": args.budget_minutes,
                "seed": args.seed,
                "device": "auto",
            },
        }
    )
    started = time.perf_counter()
    run_pipeline(config)
    wall = time.perf_counter() - started
    card = json.loads((args.out / "bundle" / "card.json").read_text())
    report = json.loads((args.out / "report" / "report.json").read_text())
    test = card["metrics"]["test"]
    result = {
        "command": "python benchmarks/train_ham10000.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": args.model,
        "img_size": args.img_size,
        "epochs_run": card["training"]["epochs_run"],
        "best_epoch": card["training"]["best_epoch"],
        "wall_minutes": wall / 60,
        "test_n": test["n"],
        "malignant_auc": test.get("malignant_auc"),
        "balanced_accuracy": test["balanced_accuracy"],
        "macro_auc": test["macro_auc"],
        "accuracy": test["accuracy"],
        "recall": test["recall"],
        "operating_point": test.get("at_operating_threshold"),
        "train_images_per_s": report.get("train_images_per_s"),
        "inference_images_per_s": report.get("inference_images_per_s"),
    }
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
