"""ABMIL vs SC-MIL on UCSB breast (58 H&E images): grouped cross-validation, repeated over seeds, balanced and 1:4.

Patches are embedded once by a frozen ImageNet EfficientNet-Lite0 (cached); each fold trains only the attention
MIL head. Folds are grouped by `tma_batch`; in the imbalanced setting the malignant *training* bags of each fold
are subsampled to one per four benign bags (test folds stay untouched).

    .venv/bin/python benchmarks/mil_benchmark.py ../shared/data/ucsb_breast --seeds 5 --epochs 60
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, Dataset

from models.registry import build_model, default_normalization
from models.scmil import SCMILLoss
from pipelines.bags import ingest_slide_table
from pipelines.config import TilingSettings
from pipelines.mil import FeatureBagDataset, cached_bag_features, collate_bags, predict_dataset_bags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="UCSB breast folder (labels.csv + images/)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--schedule", default="parabolic")
    parser.add_argument("--ratio", type=float, default=0.25, help="malignant:benign training ratio when imbalanced")
    parser.add_argument("--cache", default="runs/mil_benchmark/cache", help="embedding cache folder")
    parser.add_argument("--out", default="runs/mil_benchmark/results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)

    slides = ingest_slide_table(args.data, group_column="tma_batch")
    tiling = TilingSettings(patch_size=args.patch_size, min_tissue=args.min_tissue)
    norm = default_normalization("efficientnet-lite0")
    encoder = build_model("efficientnet-lite0", 2, args.input_size, pretrained=True).backbone
    started = time.perf_counter()
    encoder_id = f"efficientnet-lite0|pretrained=True|{args.input_size}|{json.dumps(norm)}"
    features = cached_bag_features(
        slides, tiling, encoder, encoder_id, args.input_size, norm["mean"], norm["std"], args.cache
    )
    embed_s = time.perf_counter() - started
    sizes = [len(features[s]["features"]) for s in slides.image_id]
    logging.info("features ready in %.0f s; %d-%d patches per slide", embed_s, min(sizes), max(sizes))

    # The MIL head is tiny: one thread is many times faster than two on a shared 2-core machine.
    torch.set_num_threads(1)
    y = (slides.label == "malignant").to_numpy().astype(int)
    groups = slides.group.to_numpy()
    feats = [features[s]["features"] for s in slides.image_id]
    train_started = time.perf_counter()
    results = cross_validate(feats, y, groups, args)
    train_s = time.perf_counter() - train_started
    summary = {
        key: {m: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
              for m, v in row.items()}
        for key, row in results.items()
    }
    payload = {"args": vars(args), "n_slides": len(y), "n_malignant": int(y.sum()), "patches_per_slide":
               [int(min(sizes)), float(np.mean(sizes)), int(max(sizes))], "embed_seconds": embed_s,
               "train_seconds": train_s, "results": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"{'setting/method':24s} {'accuracy':>16s} {'AUC':>16s} {'balanced acc':>16s}")
    for key, row in summary.items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['sd']:.3f}" for m in ("accuracy", "auc", "balanced_accuracy")]
        print(f"{key:24s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s}")
    print(f"embedding {embed_s:.0f} s, training {train_s:.0f} s; written to {out}")


def cross_validate(
    feats: list[torch.Tensor], y: np.ndarray, groups: np.ndarray, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Out-of-fold accuracy, AUC and balanced accuracy per seed of each "setting/method" (balanced or imbalanced
    training folds; ABMIL or SC-MIL), with folds grouped by `groups`."""
    dim = feats[0].shape[1]
    results: dict[str, dict[str, list[float]]] = {}
    for setting in ("balanced", "imbalanced"):
        for method in ("abmil", "scmil"):
            results[f"{setting}/{method}"] = {"accuracy": [], "auc": [], "balanced_accuracy": []}
    for seed in range(args.seeds):
        splitter = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(len(y)), y, groups))
        for setting in ("balanced", "imbalanced"):
            for method in ("abmil", "scmil"):
                oof = np.zeros(len(y))
                for k, (train, test) in enumerate(folds):
                    if setting == "imbalanced":
                        rng = np.random.default_rng(1000 * seed + k)
                        benign, malignant = train[y[train] == 0], train[y[train] == 1]
                        keep = max(1, int(round(args.ratio * len(benign))))
                        kept = rng.choice(malignant, min(keep, len(malignant)), replace=False)
                        train = np.concatenate([benign, kept])
                    model = _feature_head(dim, seed)
                    loss = SCMILLoss(args.epochs, method, args.schedule, args.temperature)
                    train_in_memory(model, FeatureBagDataset([feats[i] for i in train], y[train]), loss,
                                    args.epochs, args.lr, batch_size=args.batch_size, seed=seed)
                    probs = predict_dataset_bags(model, FeatureBagDataset([feats[i] for i in test], y[test]))
                    oof[test] = probs[:, 1]
                pred = (oof >= 0.5).astype(int)
                row = results[f"{setting}/{method}"]
                row["accuracy"].append(float(accuracy_score(y, pred)))
                row["auc"].append(float(roc_auc_score(y, oof)))
                row["balanced_accuracy"].append(float(((pred == 1)[y == 1].mean() + (pred == 0)[y == 0].mean()) / 2))
                logging.info("seed %d %s %s: acc %.3f auc %.3f", seed, setting, method, row["accuracy"][-1],
                             row["auc"][-1])
    return results


def train_in_memory(
    model: torch.nn.Module,
    dataset: Dataset,
    loss: SCMILLoss,
    epochs: int,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
) -> torch.nn.Module:
    """A fixed-epoch loop without checkpoints for the cross-validation folds; same model and loss as the MIL stage's
    `pipelines.training.fit`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_bags, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        for x, mask, labels in loader:
            value, _ = loss(model(x, mask, return_all=True), labels, epoch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
    return model.eval()


def _feature_head(dim: int, seed: int):
    """An SC-MIL net over cached features: the encoder is an identity, so bags of (N, dim) features go straight in."""
    from models.scmil import SCMIL

    torch.manual_seed(seed)
    return SCMIL(2, torch.nn.Identity(), dim, embed_dim=128, attention_dim=64, projection_dim=64, dropout=0.25)


if __name__ == "__main__":
    main()
