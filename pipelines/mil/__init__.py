"""SC-MIL / ABMIL: train bag classifiers on tiled H&E slides, evaluate them, predict one row per slide.

The run config's `mil:` section (validated by `MILConfig`) says where the slides are, how they are tiled and which
method trains; `training:` holds the usual trainer settings. Tiling and bag manifests live in `pipelines.bags`.

Modules: `features` (patch tensors, encoder features and their cache), `datasets` (feature and patch bag datasets,
collate, bag logits), `stage` (`run_mil_stage`, the `lesionlab run` / `mil-train` stage, one function per step),
`predict` (`predict_bag`, `predict_slides`, `tiling_of`).
"""

from __future__ import annotations

from pipelines.config import MILConfig
from pipelines.mil.datasets import (
    FeatureBagDataset,
    PatchBagDataset,
    collate_bags,
    dataset_bag_logits,
    predict_dataset_bags,
)
from pipelines.mil.features import cache_key, cached_bag_features, embed_patches, patches_to_tensor
from pipelines.mil.predict import BagPrediction, list_slides, predict_bag, predict_slides, tiling_of
from pipelines.mil.stage import (
    MIN_CALIBRATION_CASES,
    bag_forward,
    fit_bag_calibration,
    load_mil_config,
    make_loss_forward,
    run_mil_stage,
)

__all__ = [
    "MIN_CALIBRATION_CASES",
    "BagPrediction",
    "FeatureBagDataset",
    "MILConfig",
    "PatchBagDataset",
    "bag_forward",
    "cache_key",
    "cached_bag_features",
    "collate_bags",
    "dataset_bag_logits",
    "embed_patches",
    "fit_bag_calibration",
    "list_slides",
    "load_mil_config",
    "make_loss_forward",
    "patches_to_tensor",
    "predict_bag",
    "predict_dataset_bags",
    "predict_slides",
    "run_mil_stage",
    "tiling_of",
]
