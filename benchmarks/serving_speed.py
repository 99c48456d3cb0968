"""CPU serving speed, side by side in one run: eager PyTorch, ONNX Runtime fp32 and int8 (and a pruned bundle, when
given), each with its test accuracy; then the shipped predictor's full recipe (8-view TTA) against eager one-view.

    python benchmarks/serving_speed.py --data ../shared/data/ham10000 --bundle models/default_bundle \
        --out benchmarks/results/serving_speed [--pruned PRUNED_BUNDLE]

The bundle is copied to --work and exported there (`lesionlab export --int8`, calibrated on 256 of its training
images); its manifest is re-created with the library's ingest and split and must hash to the card's. Network arms
take preprocessed 224 px tensors (no decoding, no preprocessing) and run one view: batch-1 p50/p90 over --runs
forwards at 1 and 2 threads, images/s at batch 32, and balanced accuracy / malignant AUC / top-1 agreement with
eager on the 855 test images. The predictor rows time `Predictor.predict` on one decoded image (preprocessing,
views, calibration included). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_ood import recreate_manifest  # noqa: E402

from models.bundle import load_bundle  # noqa: E402
from pipelines.evaluation import compute_metrics  # noqa: E402
from pipelines.export import OnnxNet, export_bundle  # noqa: E402
from pipelines.manifest import read_manifest  # noqa: E402
from pipelines.prediction import Predictor  # noqa: E402
from pipelines.transforms import card_transform  # noqa: E402

log = logging.getLogger("serving_speed")


def _timings(forward: Callable[[torch.Tensor], object], batch: torch.Tensor, runs: int, warmup: int = 5) -> list:
    for _ in range(warmup):
        forward(batch)
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        forward(batch)
        out.append(1000 * (time.perf_counter() - started))
    return out


def _eager(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    model = model.eval().to(memory_format=torch.channels_last)

    def forward(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(batch.contiguous(memory_format=torch.channels_last)).float().numpy()

    return forward


def _onnx(path: Path, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    net = OnnxNet(path, threads=threads)
    return lambda batch: net(batch)[0].numpy()


def _scores(forward, tensors: torch.Tensor, labels: np.ndarray, names: list, malignant: list) -> tuple:
    logits = np.concatenate([forward(tensors[i : i + 32]) for i in range(0, len(tensors), 32)])
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    metrics = compute_metrics(labels, probs, names, malignant)
    return probs, metrics["balanced_accuracy"], metrics.get("malignant_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000 folder: metadata.csv + images/")
    parser.add_argument("--bundle", type=Path, default=Path("models/default_bundle"))
    parser.add_argument("--pruned", type=Path, help="a pruned bundle of the same model (adds two arms)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_speed"))
    parser.add_argument("--work", type=Path, default=Path("runs/serving_speed"))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--int8-keep-float", type=int, default=0, metavar="K",
                        help="as `lesionlab export --int8-keep-float`: the first K convolutions stay in float")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    bundles = {"unpruned": args.bundle} | ({"pruned": args.pruned} if args.pruned else {})
    copies = {}
    for name, source in bundles.items():
        copies[name] = args.work / name
        shutil.rmtree(copies[name], ignore_errors=True)
        shutil.copytree(source, copies[name])
    card = load_bundle(copies["unpruned"]).card
    manifest_path = recreate_manifest(args.data, args.work, card.get("manifest_sha256"))
    export_seconds = {}
    for name, folder in copies.items():
        started = time.perf_counter()
        export_bundle(folder, manifest_path, int8=True, keep_float=args.int8_keep_float)
        export_seconds[name] = time.perf_counter() - started
    manifest = read_manifest(manifest_path)
    test = manifest[(manifest.split == "test") & (manifest.source == "real")]
    names, malignant = card["class_names"], card["malignant_classes"]
    labels = np.array([names.index(c) for c in test.label])
    transform = card_transform(card)
    tensors = torch.stack([transform(Image.open(p).convert("RGB")) for p in test.path])
    one, batch32 = tensors[:1], tensors[:32]

    arms = []
    for name, folder in copies.items():
        bundle = load_bundle(folder)
        tag = " (pruned)" if name == "pruned" else ""
        arms += [(f"eager fp32{tag}", lambda t, b=bundle: _eager(b.model)),
                 (f"ONNX fp32{tag}", lambda t, f=folder: _onnx(f / "model.onnx", t)),
                 (f"ONNX int8{tag}", lambda t, f=folder: _onnx(f / "model.int8.onnx", t))]
        parity = bundle.card["export"]["int8"]["parity"]
        log.info("%s: int8 top-1 agreement %.3f, malignant AUC change %s (validation, one view); served: %s", name,
                 parity["top1_agreement"], parity.get("malignant_auc_change"), parity.get("served"))
    rows, reference = [], None
    for label, make in arms:
        row = {"arm": label}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            forward = make(threads)
            times = _timings(forward, one, args.runs)
            row[f"batch1_p50_ms_{threads}t"] = statistics.median(times)
            row[f"batch1_p90_ms_{threads}t"] = float(np.percentile(times, 90))
            if threads == 2:
                t32 = _timings(forward, batch32, max(5, args.runs // 10), warmup=2)
                row["batch32_images_per_s_2t"] = 32000 / statistics.median(t32)
                probs, ba, auc = _scores(forward, tensors, labels, names, malignant)
                reference = probs if reference is None else reference
                row.update(test_balanced_accuracy=ba, test_malignant_auc=auc,
                           top1_agreement_with_eager=float((probs.argmax(1) == reference.argmax(1)).mean()))
        log.info("%s", row)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for threads in (1, 2):
            row[f"speedup_batch1_{threads}t"] = base[f"batch1_p50_ms_{threads}t"] / row[f"batch1_p50_ms_{threads}t"]

    # The predictor as users run it: one decoded image in, calibrated probabilities out.
    images = [Image.open(p).convert("RGB") for p in test.path.head(args.runs + 5)]
    predictor_rows = []
    recipes = [("eager, 1 view", "unpruned", "eager", 1),
               ("eager, 8 views (the card's recipe)", "unpruned", "eager", 8),
               ("ONNX fp32, 8 views", "unpruned", "onnx", 8), ("ONNX int8, 8 views", "unpruned", "int8", 8),
               ("ONNX int8, 1 view", "unpruned", "int8", 1)]
    if "pruned" in copies:
        recipes += [("pruned, ONNX fp32, 8 views", "pruned", "onnx", 8),
                    ("pruned, ONNX int8, 8 views", "pruned", "int8", 8)]
    for label, which, engine, tta in recipes:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            predictor = Predictor.from_path(copies[which], tta=tta, engine=engine)  # ONNX: `threads` threads
            for image in images[:5]:
                predictor.predict([image])
            times = []
            for image in images[5:]:
                started = time.perf_counter()
                predictor.predict([image])
                times.append(1000 * (time.perf_counter() - started))
            predictor_rows.append({"predictor": label, "threads": threads, "p50_ms": statistics.median(times),
                                   "p90_ms": float(np.percentile(times, 90))})
            log.info("%s", predictor_rows[-1])
    eager_one = {r["threads"]: r["p50_ms"] for r in predictor_rows if r["predictor"] == "eager, 1 view"}
    for row in predictor_rows:
        row["ratio_to_eager_1_view"] = row["p50_ms"] / eager_one[row["threads"]]

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "study": "serving_speed",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "protocol": "network arms: preprocessed 224 px tensors, one view, batch-1 p50/p90 over --runs forwards after 5 "
                    "warm-up, images/s at batch 32 (2 threads), test metrics on the 855 grouped-split test images "
                    "(softmax, uncalibrated); predictor rows: Predictor.predict on one decoded image, calibrated, "
                    "with the named views and engine",
        "command": "python benchmarks/serving_speed.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                     if v is not None),
        "export_seconds": export_seconds,
        "export": {name: load_bundle(folder).card["export"] for name, folder in copies.items()},
        "networks": rows,
        "predictor": predictor_rows,
    }
    (args.out / "serving_speed.json").write_text(json.dumps(record, indent=2, default=float))
    lines = ["| arm | batch-1 p50 ms (1 / 2 threads) | × eager (1 / 2 threads) | images/s at batch 32 | test BA | "
             "test AUC | top-1 = eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['batch1_p50_ms_1t']:.1f} / {r['batch1_p50_ms_2t']:.1f} | "
                     f"{r['speedup_batch1_1t']:.2f} / {r['speedup_batch1_2t']:.2f} | {r['batch32_images_per_s_2t']:.0f}"
                     f" | {r['test_balanced_accuracy']:.3f} | {r['test_malignant_auc']:.3f} | "
                     f"{r['top1_agreement_with_eager']:.3f} |")
    lines += ["", "| predictor (one decoded image) | threads | p50 ms | p90 ms | × eager 1 view |",
              "|---|---|---|---|---|"]
    for r in predictor_rows:
        lines.append(f"| {r['predictor']} | {r['threads']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['ratio_to_eager_1_view']:.2f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "serving_speed.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
