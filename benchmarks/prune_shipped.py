"""Beta-Rank pruning of the shipped classifier bundle: where its batch-1 CPU time goes, 3 seeds, and the decision.

    # 1. widths: structure-only candidates (FLOPs target x latency-aware layer ratios), batch-1 time of each
    .venv/bin/python benchmarks/prune_shipped.py search --out runs/ship_prune
    # 2. one pruned bundle per seed with the chosen candidate (the `lesionlab prune` pipeline)
    .venv/bin/python benchmarks/prune_shipped.py prune --manifest runs/ship_prune/manifest.csv --out runs/ship_prune \
        --candidate <name from step 1> --seed 0      # and --seed 1, --seed 2
    # 3. the seeds against the shipped bundle on the test split: paired bootstrap of the 3-seed mean, and the rule
    .venv/bin/python benchmarks/prune_shipped.py summary --manifest runs/ship_prune/manifest.csv --out runs/ship_prune

The manifest is the shipped bundle's own (`lesionlab ingest --root ../shared/data/ham10000`, the grouped seed-0 split;
its SHA-256 must equal the card's `manifest_sha256`). Widths are chosen from timing alone (no accuracy is looked
at); the pruned nets' calibration and threshold are fitted on validation; the test split is only scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import PruningConfig  # noqa: E402

log = logging.getLogger("prune_shipped")
BUNDLE = Path(__file__).resolve().parents[1] / "models" / "default_bundle"
STEM = "backbone.net._conv_stem"
EARLY = ["backbone.net._conv_stem", "backbone.net._blocks.1.1._expand_conv", "backbone.net._blocks.1.2._expand_conv",
         "backbone.net._blocks.2.3._expand_conv"]
# name -> (FLOPs reduction, fixed layer ratios): uniform cuts, and cuts that spend more of the budget on the
# full-resolution early layers, whose activations dominate batch-1 time at 224 px.
CANDIDATES: dict[str, tuple[float, dict[str, float]]] = {
    "uniform_40": (0.40, {}),
    "uniform_50": (0.50, {}),
    "uniform_60": (0.60, {}),
    "early50_40": (0.40, {name: 0.5 for name in EARLY}),
    "early50_50": (0.50, {name: 0.5 for name in EARLY}),
    "early75_50": (0.50, {name: 0.75 for name in EARLY}),
    "early50_60": (0.60, {name: 0.5 for name in EARLY}),
}


def batch1_ms(model: torch.nn.Module, size: int, runs: int, threads: int) -> float:
    """Median batch-1 forward time (ms) in eager mode, after warm-up, at `threads` threads."""
    from pipelines.pruning.measure import latencies_ms

    torch.set_num_threads(threads)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return float(np.median(latencies_ms(model.eval(), x, runs=runs, warmup=5)))


def search(args: argparse.Namespace) -> None:
    """Prune structure-only copies of the shipped net to each candidate (L1 on its trained weights, 8-channel
    rounding, the stage count of the protocol) and time batch 1; interleaved rounds, median of medians."""
    import copy

    from models.bundle import load_bundle
    from pipelines.pruning import count_flops, prune_to_flops

    bundle = load_bundle(BUNDLE)
    size = bundle.input_size
    nets = {"unpruned": bundle.model.eval()}
    for name, (target, ratios) in CANDIDATES.items():
        result = prune_to_flops(copy.deepcopy(bundle.model), "l1", target, size, steps=args.steps, round_to=8,
                                layer_ratios=ratios)
        nets[name] = result.model.eval()
    times: dict[str, list[float]] = {name: [] for name in nets}
    for round_index in range(args.rounds):
        order = list(nets)[round_index % len(nets):] + list(nets)[:round_index % len(nets)]
        for name in order:
            times[name].append(batch1_ms(nets[name], size, args.runs, args.threads))
    base_flops, base_ms = count_flops(nets["unpruned"], size), float(np.median(times["unpruned"]))
    rows = []
    for name, net in nets.items():
        ms = float(np.median(times[name]))
        flops = count_flops(net, size)
        rows.append({"candidate": name, "flops_m": flops / 1e6, "flops_reduction": 1 - flops / base_flops,
                     "batch1_ms_p50": ms, "speedup": base_ms / ms, "rounds_ms": times[name],
                     "layer_ratios": CANDIDATES.get(name, (0, {}))[1]})
    out = Path(args.out) / "width_search.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "runs": args.runs, "rounds": args.rounds, "steps": args.steps, "rows": rows}
    out.write_text(json.dumps(record, indent=2))
    for row in rows:
        print(f"{row['candidate']:>12}  FLOPs {row['flops_m']:7.1f} M (-{row['flops_reduction']:.1%})  "
              f"batch-1 {row['batch1_ms_p50']:6.2f} ms  x{row['speedup']:.2f}")
    print(f"-> {out}")


def prune(args: argparse.Namespace) -> None:
    """One seed of the chosen candidate through the library's `prune_bundle` (the `lesionlab prune` pipeline)."""
    from pipelines.pruning import prune_bundle

    target, ratios = CANDIDATES[args.candidate]
    settings = PruningConfig(method=args.method, flops_reduction=target, layer_ratios=ratios, steps=args.steps,
                             fine_tune_epochs=args.epochs, seed=args.seed, bootstrap=args.bootstrap)
    out = Path(args.out) / f"{args.candidate}_seed{args.seed}"
    log.info("pruning %s (seed %d) into %s with %s", BUNDLE, args.seed, out, settings.model_dump())
    started = time.perf_counter()
    report = prune_bundle(BUNDLE, args.manifest, out, settings)
    minutes = (time.perf_counter() - started) / 60
    (out / "run.json").write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                                              "minutes": minutes}, indent=2))
    print(f"{out}: balanced accuracy {report['before']['accuracy']['balanced_accuracy']:.4f} -> "
          f"{report['after']['accuracy']['balanced_accuracy']:.4f} in {minutes:.1f} min")


def control(args: argparse.Namespace) -> None:
    """The pruning fine-tune applied to the unpruned shipped net (`pipelines.pruning.fine_tune_control`): what the
    fine-tune alone does to its validation scores, one row per setting in control.jsonl."""
    from pipelines.pruning import fine_tune_control

    settings = PruningConfig(fine_tune_epochs=args.epochs, fine_tune_lr=args.lr, fine_tune_ema=args.ema,
                             seed=args.seed)
    out = Path(args.out) / f"control_lr{args.lr:g}_ema{args.ema:g}_e{args.epochs}_seed{args.seed}"
    started = time.perf_counter()
    record = fine_tune_control(BUNDLE, args.manifest, out, settings, stages=args.stages)
    record.update(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                  minutes=(time.perf_counter() - started) / 60)
    with open(Path(args.out) / "control.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    for row in record["stages"]:
        print(f"stage {row['stage']}: validation balanced accuracy {row['balanced_accuracy']:.4f}, "
              f"malignant AUC {row['malignant_auc']:.4f}")


def _test_probs(bundle: Path, manifest: str, engine: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, class names) of a bundle as `lesionlab predict --engine ENGINE` serves it (the card's
    views, calibrated), on the manifest's test split."""
    from pipelines.images import load_image
    from pipelines.manifest import read_manifest
    from pipelines.prediction import Predictor

    rows = read_manifest(manifest)
    rows = rows[(rows.split == "test") & (rows.source == "real")].reset_index(drop=True)
    predictor = Predictor.from_path(bundle, engine=engine)
    probs = np.concatenate([predictor.predict([load_image(p) for p in rows.path[i:i + 64]])
                            for i in range(0, len(rows), 64)])
    labels = np.array([predictor.class_names.index(label) for label in rows.label])
    return labels, probs, predictor.class_names


def summary(args: argparse.Namespace) -> None:
    """The seeds against the shipped bundle on the test split, paired, and whether the pruned model may ship."""
    from pipelines.evaluation import compute_metrics, paired_bootstrap_delta

    folders = sorted(p for p in Path(args.out).glob(f"{args.candidate}_seed*") if (p / "card.json").is_file())
    # the full-precision export (equal to eager within 4e-6), not the int8 file `auto` serves: the rule compares
    # the pruned nets, which run in full precision, with the unpruned one at the same precision
    labels, reference, names = _test_probs(BUNDLE, args.manifest, "onnx")
    card = json.loads((BUNDLE / "card.json").read_text())
    malignant = card["malignant_classes"]
    runs, per_seed = [], []
    for folder in folders:
        seed_labels, probs, seed_names = _test_probs(folder, args.manifest, "eager")
        assert seed_names == names and (seed_labels == labels).all()
        runs.append(probs)
        metrics = compute_metrics(labels, probs, names, malignant)
        per_seed.append({"bundle": str(folder), "balanced_accuracy": metrics["balanced_accuracy"],
                         "malignant_auc": metrics["malignant_auc"],
                         "change": paired_bootstrap_delta(labels, reference, probs, names, malignant)})
    mean = paired_bootstrap_delta(labels, reference, np.stack(runs), names, malignant)
    base = compute_metrics(labels, reference, names, malignant)
    ba, auc = mean["balanced_accuracy"]["delta"], mean["malignant_auc"]["delta"]
    ships = ba >= -0.01 and auc >= -0.005
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "test_images": int(len(labels)),
              "unpruned": {"balanced_accuracy": base["balanced_accuracy"], "malignant_auc": base["malignant_auc"]},
              "seeds": per_seed, "mean_change": mean,
              "rule": "ship if the 3-seed mean change is >= -1 point balanced accuracy and >= -0.5 point malignant "
                      "AUC", "ships": ships}
    out = Path(args.out) / f"summary_{args.candidate}.json"
    out.write_text(json.dumps(record, indent=2, default=float))
    print(json.dumps({k: record[k] for k in ("unpruned", "mean_change", "ships")}, indent=2, default=float))
    print(f"-> {out}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("search", help="time batch 1 of structure-only candidates")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=PruningConfig().steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(func=search)
    p = sub.add_parser("prune", help="prune the shipped bundle with one candidate and seed")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--candidate", required=True, choices=sorted(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default=PruningConfig().method)
    p.add_argument("--steps", type=int, default=PruningConfig().steps)
    p.add_argument("--epochs", type=int, default=PruningConfig().fine_tune_epochs,
                   help="fine-tuning epochs after each stage")
    p.add_argument("--bootstrap", type=int, default=PruningConfig().bootstrap)
    p.set_defaults(func=prune)
    p = sub.add_parser("control", help="the pruning fine-tune alone, on the unpruned net (validation)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=PruningConfig().fine_tune_lr)
    p.add_argument("--ema", type=float, default=PruningConfig().fine_tune_ema, help="EMA decay (0: off)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per stage")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=control)
    p = sub.add_parser("summary", help="3 seeds against the shipped bundle on the test split")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--candidate", required=True, choices=sorted(CANDIDATES))
    p.set_defaults(func=summary)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
