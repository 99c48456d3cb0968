"""Beta-Rank vs L1 vs HRank vs random filter pruning on HAM10000 at several FLOPs reductions (EfficientNet-B0, CNN).

    .venv/bin/python benchmarks/prune_benchmark.py ../shared/data/ham10000 --out runs/prune_bench --size 64

Trains each baseline once (cached), fine-tunes an unpruned copy for the same budget as every pruned net (the
"unpruned+ft" control), then for every (net, FLOPs reduction, method) prunes a copy, fine-tunes it with the project's
trainer and class-weighted cross-entropy, and appends one JSON line to `results.jsonl` (re-running skips finished
lines); test-split probabilities go to `probs/`. `--plot` writes the table (with paired-bootstrap 95 % intervals of
each change against the unpruned baseline) and the accuracy-vs-FLOPs plot.

Pruning, calibration sampling and fine-tuning are the library's (`pipelines.pruning`), with `lesionlab prune`'s
defaults (`PruningConfig`) unless a flag changes them: the log names the settings that differ, and every row
records them all (`pruning_settings`). Only the baselines' training and the 64 px image cache are the benchmark's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from models.registry import PRETRAINED_WEIGHTS, default_normalization  # noqa: E402
from pipelines import pruning  # noqa: E402
from pipelines.config import PruningConfig  # noqa: E402

log = logging.getLogger("prune_benchmark")
MALIGNANT = ["mel", "bcc", "akiec"]


class ArrayDataset(Dataset):
    """Pre-decoded uint8 images (N, H, W, 3) -> normalised tensors; random flips when `augment`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], augment: bool):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255.0
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(2)
            if torch.rand(()) < 0.5:
                x = x.flip(1)
        return (x - self.mean) / self.std, int(self.labels[i])


def load_data(root: Path, size: int, cache: Path) -> tuple[dict, list[str]]:
    """Grouped split of HAM10000 and its images decoded once at `size` px (cached as .npz)."""
    from pipelines.manifest import grouped_split, ingest_ham10000
    from pipelines.transforms import eval_transform

    manifest = grouped_split(ingest_ham10000(root), 0.15, 0.15, seed=0)
    class_names = sorted(manifest.label.unique())
    if cache.is_file():
        arrays = np.load(cache)
        images = arrays["images"]
    else:
        from tqdm.auto import tqdm

        from pipelines.images import load_image

        geometry = eval_transform(size, [0, 0, 0], [1, 1, 1])
        images = np.stack([np.asarray(geometry.resize_crop(load_image(p))) for p in
                           tqdm(manifest.path, desc="decoding")])
        np.savez(cache, images=images)
    labels = np.array([class_names.index(c) for c in manifest.label])
    splits = {s: (images[(manifest.split == s).to_numpy()], labels[(manifest.split == s).to_numpy()])
              for s in ("train", "val", "test")}
    return splits, class_names


def make_loaders(splits: dict, mean, std, batch_size: int, eval_limit: int | None = None):
    train = DataLoader(ArrayDataset(*splits["train"], mean, std, True), batch_size=batch_size, shuffle=True)
    val_x, val_y = splits["val"]
    if eval_limit:
        val_x, val_y = val_x[:eval_limit], val_y[:eval_limit]
    val = DataLoader(ArrayDataset(val_x, val_y, mean, std, False), batch_size=128)
    test = DataLoader(ArrayDataset(*splits["test"], mean, std, False), batch_size=128)
    return train, val, test


def fine_tune_loader(train_loader: DataLoader, labels: np.ndarray, num_classes: int, sampler: str,
                     settings: PruningConfig) -> DataLoader:
    """The fine-tuning loader (`settings.batch_size`): shuffled, or under `--ft-sampler balanced` one that draws every
    class equally often (the library's sampler)."""
    if sampler == "none":
        return DataLoader(train_loader.dataset, batch_size=settings.batch_size, shuffle=True)
    from pipelines.training import build_sampler

    return DataLoader(train_loader.dataset, batch_size=settings.batch_size,
                      sampler=build_sampler(labels, num_classes, sampler, settings.seed))


def train_baseline(model, loaders, counts, args, run_dir: Path):
    """The unpruned baseline, trained once with the project's trainer and class-weighted cross-entropy."""
    from pipelines.config import TrainSettings
    from pipelines.training import build_loss, fit

    epochs = args.base_epochs
    settings = TrainSettings(epochs=epochs, batch_size=args.base_batch_size, lr=args.lr,
                             warmup_epochs=0.3 if epochs > 1 else 0, patience=epochs,
                             max_steps_per_epoch=args.base_steps, device="cpu", seed=args.settings.seed,
                             class_weighting="inverse", resume=False, ema_decay=0.0)
    loss = build_loss("ce", counts, weighting="inverse")
    return fit(model, loaders[0], loaders[1], loss, settings, run_dir).model


def fine_tuner(teacher, loaders, counts, args, run_dir: Path, epochs: int | None = None):
    """The library's fine-tune after each pruning stage (`pipelines.pruning.stage_fine_tuner`, PruningConfig
    settings), with class-weighted cross-entropy (unweighted under `--ft-sampler balanced`) and distillation from
    the unpruned baseline when `--distill-weight` > 0."""
    from pipelines.training import build_loss

    settings = args.settings
    weighting = "none" if args.ft_sampler == "balanced" else "inverse"
    loss = build_loss("ce", counts, weighting=weighting)
    distill = pruning.distillation_for(teacher, loss, settings, counts, weighting)
    train_settings = pruning.fine_tune_settings(settings, weighting, epochs=epochs)
    return pruning.stage_fine_tuner(lambda stage: loaders[0], loaders[1], loss, train_settings, run_dir, distill)


def evaluate(model, dataset, class_names, minority, probs_path: Path) -> dict:
    """Test-split report; the probabilities are kept for the paired bootstrap in `--plot`."""
    y, probs = pruning.served_probs(model, dataset, None, 1)
    probs_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(probs_path, probs=probs, labels=y)
    return pruning.accuracy_report(y, probs, class_names, MALIGNANT, minority)


def row_name(net: str, method: str, target: float) -> str:
    """The name of one benchmark row's run folder, probabilities and saved weights."""
    return f"{net}_{method}_{int(round(target * 100))}"


def row_key(row: dict) -> str:
    """`row_name` of a results.jsonl row."""
    return row_name(row["net"], row["method"], row["target"])


def probs_file(out: Path, net: str, method: str, target: float) -> Path:
    return out / "probs" / f"{row_name(net, method, target)}.npz"


def row_model_stem(out: Path, name: str) -> Path:
    """Where a row's weights (`.safetensors`) and channel plan (`.plan.json`) are saved, without the suffix."""
    return out / "models" / name


def save_row_model(out: Path, net: str, method: str, target: float, model) -> None:
    """Weights + channel plan of a benchmarked net, so `--retime` can time every row again in one quiet pass."""
    from safetensors.torch import save_file

    from models.pruned import extract_channel_plan

    stem = row_model_stem(out, row_name(net, method, target))
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{stem}.safetensors")
    Path(f"{stem}.plan.json").write_text(json.dumps(extract_channel_plan(model)))


def read_rows(out: Path) -> list[dict]:
    """The rows of `out`/results.jsonl, one finished (net, target, method) each."""
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def saved_rows(out: Path) -> dict[str, dict]:
    """The results.jsonl rows whose weights were saved, by `row_key` (the others are logged and left out)."""
    rows = {}
    for row in read_rows(out):
        if Path(f"{row_model_stem(out, row_key(row))}.safetensors").is_file():
            rows[row_key(row)] = row
        else:
            log.warning("no saved model for %s %s %.0f%%; not timed", row["net"], row["method"], 100 * row["target"])
    return rows


def load_row_model(out: Path, row: dict, num_classes: int) -> torch.nn.Module:
    """The saved weights of a benchmark row (one of `saved_rows`) rebuilt at 224 px."""
    from safetensors.torch import load_file

    from models.pruned import apply_channel_plan

    stem = row_model_stem(out, row_key(row))
    model = build_model(row["net"], num_classes=num_classes, img_size=224, pretrained=False)
    apply_channel_plan(model, json.loads(Path(f"{stem}.plan.json").read_text()))
    model.load_state_dict(load_file(f"{stem}.safetensors"))
    return model.eval()


def retime(out: Path, num_classes: int, rounds: int, runs: int, threads: list[int]) -> dict:
    """Batch-1 latency and batch-32 throughput at 224 px of every saved row, measured in interleaved rounds.

    One round times every model once (`runs` batch-1 runs each), so a slow spell of the shared machine hits all
    rows alike; each model's number is the median over rounds. Written to `retime.json`.
    """
    models = {name: load_row_model(out, row, num_classes) for name, row in saved_rows(out).items()}
    result = {}
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        per_round = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                per_round[name].append(pruning.measure_speed(model, 224, runs=runs, warmup=3))
        result[str(n_threads)] = {name: {key: float(np.median([m[key] for m in measured]))
                                         for key in ("latency_ms_p50", "throughput_images_per_s")}
                                  for name, measured in per_round.items()}
        log.info("%d threads: %s", n_threads,
                 {k: round(v["latency_ms_p50"], 1) for k, v in result[str(n_threads)].items()})
    (out / "retime.json").write_text(json.dumps({"rounds": rounds, "runs": runs, "by_threads": result}, indent=1))
    return result


SERVING_CONDITIONS = pruning.SERVING_CONDITIONS  # fresh, warm, frozen: see pipelines.pruning.serving_latency


def _rotated(items: list, shift: int) -> list:
    """`items` rotated left by `shift` places (modulo its length)."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def serving_retime(out: Path, data: str, num_classes: int, rounds: int, runs: int, threads: list[int]) -> dict:
    """`pruning.serving_latency` of every saved row at 224 px, each measurement in its own new process (so "fresh"
    is fresh), in interleaved rounds whose order rotates; each number is the median over rounds. Written to
    `serving_retime.json` with every round's values."""
    import subprocess

    names = list(saved_rows(out))
    measured = {str(t): {name: [] for name in names} for t in threads}
    for round_ in range(rounds):
        # rotate the order every round, so that no row is always the first one after a change of thread count
        for n_threads in _rotated(threads, round_):
            for name in _rotated(names, round_):
                done = subprocess.run([sys.executable, __file__, data, "--out", str(out), "--serve-one", name,
                                       "--serve-threads", str(n_threads), "--serve-classes", str(num_classes),
                                       "--speed-runs-224", str(runs)],
                                      check=True, capture_output=True, text=True)
                measured[str(n_threads)][name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        log.info("serving round %d/%d done", round_ + 1, rounds)
    result = {t: {name: {c: float(np.median([m[c] for m in per])) for c in SERVING_CONDITIONS}
                  for name, per in by_name.items()} for t, by_name in measured.items()}
    (out / "serving_retime.json").write_text(json.dumps({"rounds": rounds, "runs": runs, "by_threads": result,
                                                         "per_round": measured}, indent=1))
    return result


def serving_table(out: Path) -> str:
    """Markdown: each row's serving latencies and its speed-up over the unpruned baseline, per condition."""
    timed = json.loads((out / "serving_retime.json").read_text())["by_threads"]
    rows = read_rows(out)
    lines = ["| threads | net | method | target | " + " | ".join(f"{c} ms (speed-up)" for c in SERVING_CONDITIONS)
             + " |", "|" + "---|" * (4 + len(SERVING_CONDITIONS))]
    for t, by_name in timed.items():
        for r in rows:
            name = row_key(r)
            if name not in by_name:
                continue
            base = by_name.get(row_name(r["net"], "none", 0.0))
            cells = [f"{by_name[name][c]:.1f} ({base[c] / by_name[name][c]:.2f}x)" if base else
                     f"{by_name[name][c]:.1f}" for c in SERVING_CONDITIONS]
            lines.append(f"| {t} | {r['net']} | {r['method']} | {r['target']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_sets(train: tuple[np.ndarray, np.ndarray], class_names: list[str], norm: dict,
                     settings: PruningConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The library's class-balanced calibration set and random BatchNorm sample of the training split, as batches."""
    import pandas as pd

    images, labels = train
    table = pd.DataFrame({"label": np.asarray(class_names)[labels]})  # index = position in the arrays
    picks = pruning.balanced_calibration_rows(table, settings.calibration_per_class, settings.seed).index.to_numpy()
    sample = pruning.batchnorm_rows(table, settings.batchnorm_images, settings.seed).index.to_numpy()

    def batches(index: np.ndarray, batch_size: int) -> list[torch.Tensor]:
        dataset = ArrayDataset(images[index], labels[index], norm["mean"], norm["std"], False)
        return [x for x, _ in DataLoader(dataset, batch_size=batch_size)]

    return batches(picks, 32), batches(sample, 64)


def append_row(out: Path, record: dict) -> None:
    with (out / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def baseline(net: str, splits: dict, class_names: list[str], counts: list[int], minority: list[str],
             done: set, args: argparse.Namespace) -> tuple:
    """Phase 1 for one net: its baseline (trained once, cached), its "none" row, and what every row of it shares."""
    out, settings = Path(args.out), args.settings
    norm = default_normalization(net)
    loaders = make_loaders(splits, norm["mean"], norm["std"], args.base_batch_size, args.eval_limit)
    base_path = out / f"{net}_base.safetensors"
    pretrained = args.pretrained and net in PRETRAINED_WEIGHTS
    model = build_model(net, num_classes=len(class_names), img_size=args.size, pretrained=pretrained)
    if base_path.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(base_path))
    else:
        from safetensors.torch import save_file

        started = time.perf_counter()
        model = train_baseline(model, loaders, counts, args, out / f"{net}_base")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_path))
        log.info("%s baseline trained in %.0f s", net, time.perf_counter() - started)
    if (net, 0.0, "none") not in done:
        save_row_model(out, net, "none", 0.0, model)
        append_row(out, {"net": net, "target": 0.0, "method": "none",
                         **pruning.measure_model(model, args.size, runs=settings.speed_runs),
                         "speed_224": pruning.measure_speed(model, 224, runs=args.speed_runs_224),
                         "test": evaluate(model, loaders[2].dataset, class_names, minority,
                                          probs_file(out, net, "none", 0))})
        done.add((net, 0.0, "none"))
    calibration, batchnorm = calibration_sets(splits["train"], class_names, norm, settings)
    tune_loaders = (fine_tune_loader(loaders[0], splits["train"][1], len(class_names), args.ft_sampler, settings),
                    *loaders[1:])
    return model, tune_loaders, calibration, batchnorm


def benchmark_row(net: str, target: float, method: str, shared: tuple, counts: list[int], args: argparse.Namespace
                  ) -> tuple[pruning.PruneResult, float]:
    """Phase 2, one row: the unpruned fine-tune control, or a pruned copy fine-tuned after every stage."""
    model, loaders, calibration, batchnorm = shared
    settings = args.settings
    started = time.perf_counter()
    run_dir = Path(args.out) / row_name(net, method, target)
    if method == "unpruned+ft":  # the whole fine-tuning budget a pruned net gets over its stages
        tune = fine_tuner(model, loaders, counts, args, run_dir, epochs=settings.fine_tune_epochs * settings.steps)
        tuned = tune(copy.deepcopy(model), 1)
        pruning.recalibrate_batchnorm(tuned, batchnorm)  # as every pruned net gets after its fine-tune
        flops = pruning.count_flops(tuned, args.size)
        result = pruning.PruneResult(model=tuned, base_flops=flops, flops=flops)
    else:
        result = pruning.prune_to_flops(copy.deepcopy(model), method, target, args.size, calibration=calibration,
                                        steps=settings.steps, global_pruning=settings.global_pruning,
                                        max_layer_pruning=settings.max_layer_pruning,
                                        fine_tune=fine_tuner(model, loaders, counts, args, run_dir),
                                        seed=settings.seed, batchnorm_batches=batchnorm, round_to=settings.round_to,
                                        layer_ratios=settings.layer_ratios)
    return result, started


def run(args: argparse.Namespace) -> None:
    settings = args.settings
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    splits, class_names = load_data(Path(args.data), args.size, out / f"images_{args.size}.npz")
    counts = np.bincount(splits["train"][1], minlength=len(class_names)).tolist()
    minority = pruning.minority_classes_of(counts, class_names)
    log.info("train %s, classes %s, minority %s", counts, class_names, minority)
    done = set()
    if (out / "results.jsonl").is_file():
        done = {(r["net"], r["target"], r["method"]) for r in read_rows(out)}
    # phase 1: every baseline (trained once, cached)
    nets = {net: baseline(net, splits, class_names, counts, minority, done, args) for net in args.nets}
    # phase 2: the unpruned fine-tune control, then the grid, most informative target first
    grid = [(0.0, "unpruned+ft")] + [(target, method) for target in args.targets for method in args.methods]
    for target, method in grid:
        for net, shared in nets.items():
            if (net, target, method) in done:
                continue
            result, started = benchmark_row(net, target, method, shared, counts, args)
            save_row_model(out, net, method, target, result.model)
            record = {"net": net, "target": target, "method": method, "steps": settings.steps,
                      "ft_epochs": settings.fine_tune_epochs, "ft_sampler": args.ft_sampler,
                      "round_to": settings.round_to, "global_pruning": settings.global_pruning,
                      "distill_weight": settings.distill_weight,
                      "distill_class_weighted": settings.distill_class_weighted, "seed": settings.seed,
                      "layer_ratios": settings.layer_ratios, "pruning_settings": settings.model_dump(),
                      "flops_reduction": result.flops_reduction, "stages": result.stages,
                      **pruning.measure_model(result.model, args.size, runs=settings.speed_runs),
                      "speed_224": pruning.measure_speed(result.model, 224, runs=args.speed_runs_224),
                      "test": evaluate(result.model, shared[1][2].dataset, class_names, minority,
                                       probs_file(out, net, method, target)),
                      "seconds": time.perf_counter() - started}
            append_row(out, record)
            log.info("%s %s %.0f%%: FLOPs -%.1f%%, bal acc %.3f, mal AUC %.3f (%.0f s)", net, method,
                     100 * target, 100 * result.flops_reduction, record["test"]["balanced_accuracy"],
                     record["test"]["malignant_auc"], record["seconds"])


def bootstrap_against(out: Path, net: str, row: dict, class_names: list[str], reference: str) -> dict | None:
    """Paired-bootstrap change of `row` against `net`'s unpruned `reference` row (None if probabilities are missing)."""
    from pipelines.evaluation import paired_bootstrap_delta

    base_path, row_path = probs_file(out, net, reference, 0), probs_file(out, net, row["method"], row["target"])
    if row["method"] == reference or not (base_path.is_file() and row_path.is_file()):
        return None
    base, new = np.load(base_path), np.load(row_path)
    if not np.array_equal(base["labels"], new["labels"]):
        raise ValueError(f"{row_path} and {base_path} were scored on different test cases")
    return paired_bootstrap_delta(base["labels"], base["probs"], new["probs"], class_names, MALIGNANT)


def _delta_cell(delta: dict | None, key: str) -> str:
    if delta is None:
        return "n/a"
    d = delta[key]
    return f"{100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _reference_probs(folders: list[Path], net: str, reference: str) -> dict | None:
    """The `reference` row's test probabilities, which every seed folder that has it must share (None if none has)."""
    paths = [path for path in (probs_file(folder, net, reference, 0) for folder in folders) if path.is_file()]
    if not paths:
        return None
    with np.load(paths[0]) as archive:
        first = {"labels": archive["labels"], "probs": archive["probs"]}
    for path in paths[1:]:
        other = np.load(path)
        if not (np.array_equal(other["labels"], first["labels"]) and np.array_equal(other["probs"], first["probs"])):
            raise ValueError(f"{path} differs from {paths[0]}: the seed folders must share one {net} '{reference}' "
                             "row (copy it, with its probabilities, into each folder)")
    return first


def seed_summary(folders: list[Path], class_names: list[str]) -> str:
    """Markdown table: every pruned (net, method, target) row over the seed folders that have it, with the mean of
    their changes against the shared unpruned baseline ("none") and control ("unpruned+ft"), each with a 95 %
    paired bootstrap interval of the mean, and the mean recall of the minority classes."""
    from pipelines.evaluation import paired_bootstrap_delta

    entries: dict[tuple, list[tuple[Path, dict]]] = {}
    for folder in folders:
        for row in read_rows(folder):
            if row["method"] not in ("none", "unpruned+ft"):
                entries.setdefault((row["net"], row["method"], row["target"]), []).append((folder, row))
    minority = [c for c in ("akiec", "df", "vasc") if c in class_names]
    references = {(net, reference): _reference_probs(folders, net, reference)
                  for net in {net for net, _, _ in entries} for reference in ("none", "unpruned+ft")}
    lines = ["| net | method | target | seeds | bal. acc per seed | mean Δ bal. acc, points [95 % CI] "
             "| mean Δ mal. AUC, points [95 % CI] | mean Δ vs unpruned+ft: bal. acc / mal. AUC | "
             + " | ".join(f"mean {c} recall" for c in minority) + " |",
             "|" + "---|" * (8 + len(minority))]
    for (net, method, target), runs in sorted(entries.items()):
        probs = np.stack([np.load(probs_file(folder, net, method, target))["probs"] for folder, _ in runs])
        cells = {}
        for reference in ("none", "unpruned+ft"):
            ref = references[net, reference]
            cells[reference] = None if ref is None else paired_bootstrap_delta(ref["labels"], ref["probs"], probs,
                                                                               class_names, MALIGNANT)
        control = cells["unpruned+ft"]
        versus_control = "n/a" if control is None else (
            f"{_delta_cell(control, 'balanced_accuracy')} / {_delta_cell(control, 'malignant_auc')}")
        per_seed = ", ".join(f"{row['test']['balanced_accuracy']:.3f}" for _, row in runs)
        recalls = " | ".join(f"{np.mean([row['test']['recall'][c] for _, row in runs]):.3f}" for c in minority)
        lines.append(f"| {net} | {method} | {target:.0%} | {len(runs)} | {per_seed} | "
                     f"{_delta_cell(cells['none'], 'balanced_accuracy')} | "
                     f"{_delta_cell(cells['none'], 'malignant_auc')} | {versus_control} | {recalls} |")
    return "\n".join(lines)


def plot(results_path: Path, png: Path, class_names: list[str]) -> str:
    """Write the accuracy-vs-FLOPs plot; return the markdown table (changes in points, 95 % paired bootstrap).

    Changes are given against the unpruned baseline (the goal) and against the unpruned net fine-tuned for the same
    budget as the pruned ones ("unpruned+ft"), which separates the effect of pruning from that of more training.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = results_path.parent
    rows = read_rows(out)
    retimed = {}  # the interleaved re-timing of `--retime`, when it ran, replaces each row's own 224 px timing
    if (out / "retime.json").is_file():
        retimed = json.loads((out / "retime.json").read_text())["by_threads"]
    nets = sorted({r["net"] for r in rows})
    fig, axes = plt.subplots(2, len(nets), figsize=(5 * len(nets), 7), squeeze=False)
    speed_head = ("p50 ms 224 px, batch 1 (1 / 2 threads) | img/s 224 px, batch 32 (2 threads)" if retimed
                  else "p50 ms (64/224 px) | img/s 224")
    lines = [f"| net | method | target | FLOPs removed | params | MFLOPs | file KB | {speed_head} "
             "| bal. acc | Δ bal. acc, points [95 % CI] | mal. AUC | Δ mal. AUC, points [95 % CI] | minority recall "
             "| Δ vs unpruned+ft: bal. acc / mal. AUC |",
             "|" + "---|" * 15]
    for col, net in enumerate(nets):
        base = next(r for r in rows if r["net"] == net and r["method"] == "none")
        order = {"none": 0, "unpruned+ft": 1}
        for r in sorted((r for r in rows if r["net"] == net), key=lambda r: (order.get(r["method"], 2), r["method"],
                                                                              r["target"])):
            removed = 1 - r["flops"] / base["flops"]
            t = r["test"]
            delta = bootstrap_against(out, net, r, class_names, "none")
            control_delta = bootstrap_against(out, net, r, class_names, "unpruned+ft") if r["target"] else None
            versus_control = "n/a" if control_delta is None else (
                f"{_delta_cell(control_delta, 'balanced_accuracy')} / {_delta_cell(control_delta, 'malignant_auc')}")
            key = row_key(r)
            if retimed and all(key in by for by in retimed.values()):
                one, two = retimed.get("1", retimed[max(retimed)])[key], retimed[max(retimed)][key]
                speed = (f"{one['latency_ms_p50']:.1f} / {two['latency_ms_p50']:.1f} | "
                         f"{two['throughput_images_per_s']:.0f}")
            else:
                speed = (f"{r['latency_ms_p50']:.1f} / {r['speed_224']['latency_ms_p50']:.1f} | "
                         f"{r['speed_224']['throughput_images_per_s']:.0f}")
            lines.append(f"| {net} | {r['method']} | {r['target']:.0%} | {removed:.1%} | {r['params'] / 1e6:.2f} M | "
                         f"{r['flops'] / 1e6:.1f} | {r['file_bytes'] / 1024:.0f} | {speed} | "
                         f"{t['balanced_accuracy']:.3f} | {_delta_cell(delta, 'balanced_accuracy')} | "
                         f"{t['malignant_auc']:.3f} | {_delta_cell(delta, 'malignant_auc')} | "
                         f"{t['minority_recall']:.3f} | {versus_control} |")
        control = next((r for r in rows if r["net"] == net and r["method"] == "unpruned+ft"), None)
        for row, key in enumerate(("balanced_accuracy", "malignant_auc")):
            ax = axes[row][col]
            for method in sorted({r["method"] for r in rows if r["method"] not in order}):
                pts = sorted((1 - r["flops"] / base["flops"], r["test"][key]) for r in rows
                             if r["net"] == net and r["method"] == method)
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.axhline(base["test"][key], color="k", ls="--", lw=1, label="unpruned")
            if control is not None:
                ax.axhline(control["test"][key], color="gray", ls=":", lw=1, label="unpruned + same fine-tune")
            ax.set_xlabel("FLOPs removed (%)")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(net)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return "\n".join(lines)


# PruningConfig fields the benchmark sets otherwise (--methods, --targets) or does not use; the others are flags
# with PruningConfig's defaults, under the benchmark's names
NOT_FLAGS = ("method", "flops_reduction", "eval_split", "target_sensitivity", "bootstrap")
FLAG_NAMES = {"fine_tune_epochs": "ft_epochs", "fine_tune_lr": "ft_lr", "max_steps_per_epoch": "ft_steps",
              "calibration_per_class": "calib_per_class", "global_pruning": "global", "layer_ratios": "layer_ratio"}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cli.common import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="HAM10000 root (metadata.csv + images/), e.g. ../shared/data/ham10000")
    parser.add_argument("--out", default="runs/prune_bench")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--nets", nargs="+", default=["small-cnn", "efficientnet-b0"])
    parser.add_argument("--methods", nargs="+", default=list(pruning.METHODS), choices=list(pruning.METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3, 0.7])
    parser.add_argument("--base-batch-size", type=int, default=64, help="batch size of the baseline training")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the baseline training")
    parser.add_argument("--base-epochs", type=int, default=6)
    parser.add_argument("--base-steps", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None, help="validation images used by the trainer")
    add_model_arguments(parser, PruningConfig, skip=NOT_FLAGS, flags=FLAG_NAMES,
                        metavars={"layer_ratios": "CONV=FRACTION", "fine_tune_epochs": "EPOCHS", "fine_tune_lr": "LR",
                                  "max_steps_per_epoch": "STEPS", "calibration_per_class": "N"})
    parser.add_argument("--ft-sampler", choices=["none", "balanced"], default="none",
                        help="fine-tuning draws (default: shuffled, class-weighted loss; balanced: every class "
                             "equally often, unweighted loss)")
    parser.add_argument("--speed-runs-224", type=int, default=20)
    parser.add_argument("--pretrained", action="store_true",
                        help="start EfficientNet-Lite from ImageNet weights and B0 from ImageNet Lite0 weights")
    parser.add_argument("--plot", action="store_true", help="only write table + plot from results.jsonl")
    parser.add_argument("--seed-folders", nargs="+", type=Path, default=[],
                        help="with --plot: also print the mean over --out and these folders (other seeds of the same "
                             "rows, sharing the baseline) with a paired bootstrap interval of the mean")
    parser.add_argument("--retime", action="store_true",
                        help="only re-time every saved row at 224 px in interleaved rounds (retime.json)")
    parser.add_argument("--retime-rounds", type=int, default=5)
    parser.add_argument("--retime-threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--serving", action="store_true",
                        help="only time every saved row's batch-1 serving latency fresh, warm and frozen, each in a "
                             "new process (serving_retime.json, table printed)")
    parser.add_argument("--serve-one", help=argparse.SUPPRESS)  # the child process of --serving: one saved row
    parser.add_argument("--serve-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--serve-classes", type=int, default=7, help=argparse.SUPPRESS)
    return parser


def pruning_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PruningConfig:
    """The PruningConfig of the flags given (the library's defaults for the others), logged with what differs."""
    from pipelines.cli.common import CliError, settings_from_args

    try:
        settings = settings_from_args(PruningConfig, args, "pruning")
    except CliError as err:
        parser.error(str(err))
    defaults = PruningConfig().model_dump()
    changed = {k: v for k, v in settings.model_dump().items() if v != defaults[k] and k not in NOT_FLAGS}
    log.info("pruning settings: PruningConfig defaults%s", f", except {changed}" if changed else "")
    return settings


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.settings = pruning_settings(parser, args)
    if args.serve_one:
        torch.set_num_threads(args.serve_threads)
        model = load_row_model(Path(args.out), saved_rows(Path(args.out))[args.serve_one], args.serve_classes)
        print(json.dumps(pruning.serving_latency(model, args.speed_runs_224)))
        return
    if args.plot or args.retime or args.serving:
        out = Path(args.out)
        from pipelines.manifest import ingest_ham10000

        class_names = sorted(ingest_ham10000(Path(args.data)).label.unique())
        if args.retime:
            retime(out, len(class_names), args.retime_rounds, args.speed_runs_224, args.retime_threads)
        if args.serving:
            serving_retime(out, args.data, len(class_names), args.retime_rounds, args.speed_runs_224,
                           args.retime_threads)
            print(serving_table(out))
        if args.plot:
            print(plot(out / "results.jsonl", out / "prune_benchmark.png", class_names))
            if args.seed_folders:
                print(seed_summary([out, *args.seed_folders], class_names))
        return
    run(args)


if __name__ == "__main__":
    main()
