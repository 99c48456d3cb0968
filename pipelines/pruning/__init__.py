"""Structural filter pruning with Torch-Pruning and a Beta-Rank importance (arXiv 2304.07461), `lesionlab prune`.

Modules: `importance` (Beta-Rank, HRank, L1 and random as Torch-Pruning importances), `search` (one pruning step,
the prune-to-FLOPs ratio search, floors, channel rounding, BatchNorm re-estimation), `finetune` (the fine-tune after
each stage, distillation from the unpruned net), `data` (calibration and BatchNorm samples), `measure` (FLOPs,
parameters, latency), `report` (before / after accuracy, `pruning_report.md`) and `bundle` (`prune_bundle`, the
`pruning` stage of `lesionlab run`). The settings are `pipelines.config.PruningConfig`.
"""

from __future__ import annotations

from pipelines.pruning.bundle import (
    fine_tune_control,
    load_pruning_config,
    prune_bundle,
    run_pruning_stage,
    served_probs,
)
from pipelines.pruning.data import balanced_calibration_rows, batchnorm_rows
from pipelines.pruning.finetune import (
    distillation_for,
    distillation_loss,
    fine_tune_settings,
    stage_fine_tuner,
    stage_train_loaders,
)
from pipelines.pruning.importance import (
    DATA_METHODS,
    METHODS,
    BetaRankImportance,
    HRankImportance,
    L1Importance,
    LayerwiseImportance,
    SeededRandomImportance,
    beta_from_sigmas,
    beta_rank_scores,
    build_importance,
    conv_layers,
    filter_group,
    hrank_scores,
    normalize_per_layer,
)
from pipelines.pruning.measure import (
    SERVING_CONDITIONS,
    count_flops,
    count_parameters,
    latencies_ms,
    measure_model,
    measure_speed,
    serving_latency,
    weights_file_size,
)
from pipelines.pruning.report import accuracy_report, minority_classes_of, write_pruning_report
from pipelines.pruning.search import (
    PruneResult,
    kept_channels,
    prune_once,
    prune_to_flops,
    recalibrate_batchnorm,
)

__all__ = [
    "DATA_METHODS",
    "METHODS",
    "SERVING_CONDITIONS",
    "BetaRankImportance",
    "HRankImportance",
    "L1Importance",
    "LayerwiseImportance",
    "PruneResult",
    "SeededRandomImportance",
    "accuracy_report",
    "balanced_calibration_rows",
    "batchnorm_rows",
    "beta_from_sigmas",
    "beta_rank_scores",
    "build_importance",
    "conv_layers",
    "count_flops",
    "count_parameters",
    "distillation_for",
    "distillation_loss",
    "filter_group",
    "fine_tune_control",
    "fine_tune_settings",
    "hrank_scores",
    "kept_channels",
    "latencies_ms",
    "load_pruning_config",
    "measure_model",
    "measure_speed",
    "minority_classes_of",
    "normalize_per_layer",
    "prune_bundle",
    "prune_once",
    "prune_to_flops",
    "recalibrate_batchnorm",
    "run_pruning_stage",
    "served_probs",
    "serving_latency",
    "stage_fine_tuner",
    "stage_train_loaders",
    "weights_file_size",
    "write_pruning_report",
]
