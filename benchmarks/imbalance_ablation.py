"""Class-imbalance ablation on HAM10000: one frozen backbone, one grouped split per seed, one head per arm.

Usage:
    python benchmarks/imbalance_ablation.py ../shared/data/ham10000 --out runs/imbalance_ablation --seeds 0 1 2

Phase 1 embeds every image once with the frozen ImageNet EfficientNet-Lite0 (cached in OUT/embeddings_*.npz).
Phase 2, for every seed: a grouped, label-stratified train/val/test split (seed), then every arm trains the same
linear head on the same training embeddings (decoupled classifier training), selects its epoch on validation
balanced accuracy and is scored once on the test split. Writes OUT/results.csv, OUT/summary.md and a bar chart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.manifest import grouped_split, ingest_ham10000  # noqa: E402

log = logging.getLogger("imbalance_ablation")
RECALL_CLASSES = ["mel", "bcc", "akiec", "df", "vasc"]
MALIGNANT = ["mel", "bcc", "akiec"]


def embed_all(df: pd.DataFrame, model_name: str, img_size: int, cache: Path, batch_size: int) -> np.ndarray:
    """Embeddings of every manifest row (eval transform, frozen ImageNet weights), cached on disk."""
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if list(data["image_id"]) == df.image_id.tolist():
            log.info("embeddings loaded from %s", cache)
            return data["features"]
        raise SystemExit(f"cache {cache} was made for other images; delete it or pick another --out")
    from models.registry import build_model, default_normalization
    from pipelines.balancing import embed_dataset
    from pipelines.data import ImageDataset
    from pipelines.transforms import eval_transform

    class_names = sorted(df.label.unique())
    model = build_model(model_name, len(class_names), img_size, pretrained=True)
    dataset = ImageDataset(df, class_names, eval_transform(img_size, **default_normalization(model_name)))
    started = time.perf_counter()
    features = embed_dataset(model, dataset, batch_size, desc=f"embedding {len(df)} images")
    log.info("embedded %d images in %.0f s", len(df), time.perf_counter() - started)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features, image_id=np.asarray(df.image_id.tolist()))
    return features


# (arm, loss, class weighting, sampler, resampling method or None, post-hoc prior correction)
ARMS: list[tuple[str, str, str, str, str | None, bool]] = [
    ("none", "ce", "none", "none", None, False),
    ("class-weighted CE (inverse)", "ce", "inverse", "none", None, False),
    ("class-weighted CE (effective, β=0.999)", "ce", "effective", "none", None, False),
    ("focal (γ=2)", "focal", "none", "none", None, False),
    ("logit-adjusted (τ=1)", "logit-adjusted", "none", "none", None, False),
    ("balanced sampler", "ce", "none", "balanced", None, False),
    ("feature-space SMOTE", "ce", "none", "none", "smote", False),
    ("feature-space BorderlineSMOTE", "ce", "none", "none", "borderline-smote", False),
    ("feature-space ADASYN", "ce", "none", "none", "adasyn", False),
    ("feature-space SMOTETomek", "ce", "none", "none", "smote-tomek", False),
    ("threshold moving (prior correction)", "ce", "none", "none", None, True),
]
# Combinations; the one with the best mean *validation* balanced accuracy is reported as "best combination".
COMBINATIONS: list[tuple[str, str, str, str, str | None, bool]] = [
    ("SMOTE ½ + prior correction", "ce", "none", "none", "smote-0.5", True),
    ("SMOTE ½ + logit-adjusted", "logit-adjusted", "none", "none", "smote-0.5", False),
    ("SMOTE ½ + class-weighted CE", "ce", "inverse", "none", "smote-0.5", False),
    ("focal + class weights (inverse)", "focal", "inverse", "none", None, False),
    ("sqrt sampler + logit-adjusted", "logit-adjusted", "none", "sqrt", None, False),
    ("sqrt sampler + prior correction", "ce", "none", "sqrt", None, True),
]


def run_arm(arm: tuple, data: dict, class_names: list[str], seed: int, args: argparse.Namespace) -> dict:
    """Train one head for one arm on one seed's split; validation-selected epoch; test metrics."""
    from torch import nn

    from pipelines.balancing import (
        FeatureResampler,
        build_loss,
        prior_corrected_probs,
        train_head,
    )
    from pipelines.evaluation import compute_metrics

    name, loss_name, weighting, sampler, method, prior = arm
    x_train, y_train = data["train"]
    if method is not None:
        kind, _, ratio = method.partition("-0.")
        ratio = float(f"0.{ratio}") if ratio else 1.0
        x_train, y_train = FeatureResampler(kind, ratio, 5, seed).fit_resample(x_train, y_train)
    counts = np.bincount(y_train, minlength=len(class_names))
    torch.manual_seed(seed)
    head = nn.Linear(x_train.shape[1], len(class_names))
    loss_fn = build_loss(loss_name, counts.tolist(), weighting)
    started = time.perf_counter()
    head, history = train_head(head, x_train, y_train, *data["val"], loss_fn, args.head_epochs, args.head_lr,
                               1e-4, args.head_batch_size, sampler, seed)
    seconds = time.perf_counter() - started
    row = {"seed": seed, "arm": name, "train_rows": len(y_train), "head_seconds": seconds,
           "best_epoch": int(np.argmax([h["val_balanced_accuracy"] for h in history])) + 1}
    for split in ("val", "test"):
        x, y = data[split]
        with torch.no_grad():
            probs = torch.softmax(head(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()
        if prior:
            probs = prior_corrected_probs(probs, counts / counts.sum())
        metrics = compute_metrics(y, probs, class_names, MALIGNANT)
        row[f"{split}_balanced_accuracy"] = metrics["balanced_accuracy"]
        if split == "test":
            row["macro_auc"] = metrics["macro_auc"]
            row["malignant_auc"] = metrics["malignant_auc"]
            for c in RECALL_CLASSES:
                row[f"recall_{c}"] = metrics["per_class"][c]["recall"]
    return row


def summarise(results: pd.DataFrame, best: str) -> str:
    """A markdown table: mean ± sd over seeds of every reported metric, per arm."""
    columns = ["test_balanced_accuracy", "macro_auc", "malignant_auc", *[f"recall_{c}" for c in RECALL_CLASSES],
               "val_balanced_accuracy"]
    headers = ["balanced acc.", "macro AUC", "malignant AUC", *[f"recall {c}" for c in RECALL_CLASSES],
               "val bal. acc."]
    headers.append("Δ bal. acc. vs none (paired)")
    lines = ["| arm | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    order = list(dict.fromkeys(results.arm))
    base = results[results.arm == "none"].set_index("seed").test_balanced_accuracy
    for arm in order:
        part = results[results.arm == arm]
        cells = [f"{100 * part[c].mean():.1f} ± {100 * part[c].std(ddof=1):.1f}" for c in columns]
        delta = 100 * (part.set_index("seed").test_balanced_accuracy - base.reindex(part.seed))
        cells.append(f"{delta.mean():+.1f} ± {delta.std(ddof=1):.1f}")
        label = f"**best combination: {arm}**" if arm == best else arm
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(results: pd.DataFrame, arms: list[str], path: Path) -> None:
    """Balanced accuracy and rare-class recall (mean ± sd over seeds) per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["test_balanced_accuracy", "recall_mel", "recall_df", "recall_vasc"]
    labels = ["balanced accuracy", "recall mel", "recall df", "recall vasc"]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(metrics)
    xs = np.arange(len(arms))
    for k, (metric, label) in enumerate(zip(metrics, labels, strict=True)):
        means = [100 * results.loc[results.arm == a, metric].mean() for a in arms]
        sds = [100 * results.loc[results.arm == a, metric].std(ddof=1) for a in arms]
        ax.bar(xs + (k - 1.5) * width, means, width, yerr=sds, capsize=2, label=label)
    ax.set_xticks(xs, [f"{a}\n(best combination)" if a == arms[-1] else a for a in arms], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("% on the held-out test split (mean ± sd, 3 seeds)")
    ax.set_title("HAM10000 imbalance ablation (frozen EfficientNet-Lite0 embeddings, linear head)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="HAM10000 folder (metadata.csv + images/)")
    parser.add_argument("--out", default="runs/imbalance_ablation")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--head-batch-size", type=int, default=128)
    parser.add_argument("--plot", help="bar chart PNG (default OUT/imbalance_ablation.png)")
    parser.add_argument("--embed-only", action="store_true", help="stop after caching the embeddings")
    parser.add_argument("--head-threads", type=int, default=1,
                        help="torch threads for head training (tiny matmuls: more threads only spin on a busy machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines.balancing").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    out = Path(args.out)
    df = ingest_ham10000(args.data)
    features = embed_all(df, args.model, args.img_size, out / f"embeddings_{args.model}_{args.img_size}.npz",
                         args.batch_size)
    if args.embed_only:
        return 0
    torch.set_num_threads(args.head_threads)
    class_names = sorted(df.label.unique())
    y_all = np.array([class_names.index(c) for c in df.label])
    rows = []
    for seed in args.seeds:
        split = grouped_split(df, 0.15, 0.15, seed=seed).split.to_numpy()
        data = {s: (features[split == s], y_all[split == s]) for s in ("train", "val", "test")}
        log.info("seed %d: train %s", seed, dict(zip(class_names, np.bincount(data["train"][1]).tolist(),
                                                         strict=True)))
        for arm in ARMS + COMBINATIONS:
            row = run_arm(arm, data, class_names, seed, args)
            log.info("seed %d %-40s val BA %.3f test BA %.3f (%.1f s)", seed, arm[0], row["val_balanced_accuracy"],
                     row["test_balanced_accuracy"], row["head_seconds"])
            rows.append(row)
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    results = pd.DataFrame(rows)
    combos = [c[0] for c in COMBINATIONS]
    val_means = results[results.arm.isin(combos)].groupby("arm").val_balanced_accuracy.mean()
    best = str(val_means.idxmax())
    shown = [a[0] for a in ARMS] + [best]
    table = summarise(results[results.arm.isin(shown)], best)
    candidates = summarise(results[results.arm.isin(combos + ["none"])], best)
    base = results[results.arm == "none"].test_balanced_accuracy.mean()
    top = results[results.arm.isin(shown)].groupby("arm").test_balanced_accuracy.mean()
    summary = [f"# Imbalance ablation ({len(args.seeds)} seeds: {args.seeds})", "",
               f"Data: {args.data} ({len(df)} images); frozen ImageNet {args.model} embeddings at {args.img_size} px; "
               f"linear head, {args.head_epochs} epochs, lr {args.head_lr}, batch {args.head_batch_size}; "
               "grouped split 70/15/15 per seed; epoch chosen on validation balanced accuracy.", "",
               "Test split, % (mean ± sd over seeds):", "", table, "",
               f"Best arm on test: {top.idxmax()} ({100 * top.max():.1f}); 'none': {100 * base:.1f} "
               f"(+{100 * (top.max() - base):.1f} points).", "",
               "Combination candidates (the best by mean validation balanced accuracy is reported above):", "",
               candidates, ""]
    (out / "summary.md").write_text("\n".join(summary))
    (out / "summary.json").write_text(json.dumps({"best_combination": best, "args": vars(args)}, indent=2))
    bar_chart(results[results.arm.isin(shown)], shown, Path(args.plot or out / "imbalance_ablation.png"))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
