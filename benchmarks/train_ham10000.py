"""Train the default recipe on the full HAM10000 folder and report calibrated, test-time-augmented test metrics.

python benchmarks/train_ham10000.py --data ../shared/data/ham10000 --out runs/bench_ham10000

Every setting is chosen before the run (or on the validation split); the test split is only scored. The record
(`benchmark.json`: command, date, settings, metrics) is written into --out; copy it under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from pathlib import Path

from pipelines.config import RunConfig
from pipelines.run import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000 folder: metadata.csv + images/")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ham10000"))
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=20, help="upper bound; the budget decides how many run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sampler", default="sqrt", choices=["none", "balanced", "sqrt"])
    parser.add_argument("--class-weighting", default="effective", choices=["none", "inverse", "effective"])
    parser.add_argument("--loss", default="ce", choices=["ce", "focal", "logit-adjusted"])
    parser.add_argument("--ema-decay", type=float, default=0.998, help="0 turns the EMA off")
    parser.add_argument("--color-constancy", default="shades_of_gray", choices=["none", "shades_of_gray"])
    parser.add_argument("--mixup-alpha", type=float, default=0.0)
    parser.add_argument("--cutmix-alpha", type=float, default=0.0)
    parser.add_argument("--tta", type=int, default=8, choices=[1, 8])
    parser.add_argument("--calibration", default="temperature", choices=["temperature", "vector", "none"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--budget-minutes", type=float, default=75.0,
                        help="training wall-clock budget; the cosine is planned to end inside it; 0 runs exactly "
                        "--epochs (a fixed schedule that CPU load cannot change, for repeat seeds)")
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="training seed (initial head, sampling, augmentation)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="grouped-split seed; keep 0 so every run is scored on the same 855 test images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config = RunConfig.model_validate(
        {
            "run_dir": str(args.out),
            "data": {"format": "ham10000", "root": str(args.data)},
            "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": args.split_seed},
            "model": {"name": args.model, "img_size": args.img_size, "pretrained": True,
                      "color_constancy": args.color_constancy},
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_epochs": 1,
                "patience": args.patience,
                "sampler": args.sampler,
                "class_weighting": args.class_weighting,
                "loss": args.loss,
                "ema_decay": args.ema_decay,
                "mixup_alpha": args.mixup_alpha,
                "cutmix_alpha": args.cutmix_alpha,
                "tta": args.tta,
                "calibration": args.calibration,
                "mixed_precision": args.mixed_precision,
                "time_budget_minutes": args.budget_minutes or None,
                "schedule_to_budget": bool(args.budget_minutes),
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
        "study": "default_bundle",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "command": "python benchmarks/train_ham10000.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": args.model,
        "img_size": args.img_size,
        "epochs_run": card["training"]["epochs_run"],
        "epochs_planned": card["training"].get("epochs_planned"),
        "best_epoch": card["training"]["best_epoch"],
        "train_minutes": card["training"].get("train_minutes"),
        "wall_minutes": wall / 60,
        "calibration": card.get("calibration"),
        "inference": card.get("inference"),
        "test": test,
        "validation": card["metrics"]["validation"],
        "history": report.get("history"),
        "train_images_per_s": report.get("train_images_per_s"),
        "inference_images_per_s": report.get("inference_images_per_s"),
    }
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
