"""DermaFlux synthesis: LoRA fine-tuning of FLUX.1 (diffusers + peft + Accelerate), rare-class generation through a
memorisation guard and a quality filter, ready-made synthetic folders, and the report that judges a synthetic set.

Submodules, one concern each:
    `flux`: FluxPipeline loading, dtypes, LoRA loading (`load_lora`), captions fitted to the text encoders.
    `kohya`: diffusers-, kohya- and BFL-format LoRA files, applied in full or refused (`load_lora_file`).
    `lora_training`: `finetune_lora` and its steps (encoding, noise and timesteps, one step, checkpoints).
    `filters`: `MemorisationGuard`, `QualityFilter` and the embeddings the guard uses.
    `generation`: `plan_counts`, `generate_images`, `synthesize`.
    `folder`: a folder (or CSV) of ready-made synthetic images into the training split.
    `metrics` and `report`: KID, precision / recall, density / coverage, likely copies; `synth_report`.
    `efficacy`: rare classes, stratified subsamples, paired "real only" vs "real + synthetic" comparison.
    `stages`: `run_finetune_stage`, `run_synthesis_stage` for `lesionlab run`.
    `tiny_flux`: a tiny random FLUX pipeline that stands in for FLUX.1 weights offline (imported on its own, so that
    `python -m pipelines.synthesis.tiny_flux DIR` runs without a warning).

The config models (`FinetuneConfig`, `SynthesisConfig`, `SynthReportConfig`) live in `pipelines.config` and are
re-exported here.
"""

from pipelines.config import FinetuneConfig, SynthesisConfig, SynthReportConfig
from pipelines.synthesis.efficacy import (
    ARM_DIRS,
    ARMS,
    MIN_PER_CLASS,
    REAL_ONLY,
    WITH_SYNTHETIC,
    build_arm_manifests,
    paired_change,
    paired_recall_change,
    rare_classes_of,
    stratified_quotas,
    subsample_train,
)
from pipelines.synthesis.filters import (
    ClassifierEmbedder,
    MemorisationGuard,
    PixelEmbedder,
    QualityFilter,
    make_embedder,
)
from pipelines.synthesis.flux import (
    LORA_WEIGHTS_NAME,
    check_resolution,
    fit_caption,
    fit_captions_to_pipe,
    load_flux_pipeline,
    load_lora,
    lora_weights_file,
    torch_dtype,
)
from pipelines.synthesis.folder import add_synthetic_folder, sample_per_class, synthetic_rows_from_folder
from pipelines.synthesis.generation import SynthesisReport, generate_images, plan_counts, synthesize
from pipelines.synthesis.kohya import LoraLoadError, LoraReport, load_lora_file
from pipelines.synthesis.lora_training import LORA_TARGET_MODULES, FinetuneResult, finetune_lora
from pipelines.synthesis.metrics import (
    kid,
    kth_neighbour_distance,
    mmd2_unbiased,
    nearest_neighbour_similarity,
    polynomial_kernel,
    prdc,
)
from pipelines.synthesis.report import (
    HISTOGRAM_PNG,
    REPORT_JSON,
    REPORT_MD,
    SMALL_CNN,
    FeatureExtractor,
    format_number,
    load_synthetic_rows,
    make_extractor,
    synth_report,
)
from pipelines.synthesis.stages import run_finetune_stage, run_synthesis_stage

__all__ = [
    "ARMS",
    "ARM_DIRS",
    "HISTOGRAM_PNG",
    "LORA_TARGET_MODULES",
    "LORA_WEIGHTS_NAME",
    "MIN_PER_CLASS",
    "REAL_ONLY",
    "REPORT_JSON",
    "REPORT_MD",
    "SMALL_CNN",
    "WITH_SYNTHETIC",
    "ClassifierEmbedder",
    "FeatureExtractor",
    "FinetuneConfig",
    "FinetuneResult",
    "LoraLoadError",
    "LoraReport",
    "MemorisationGuard",
    "PixelEmbedder",
    "QualityFilter",
    "SynthReportConfig",
    "SynthesisConfig",
    "SynthesisReport",
    "add_synthetic_folder",
    "build_arm_manifests",
    "check_resolution",
    "finetune_lora",
    "fit_caption",
    "fit_captions_to_pipe",
    "format_number",
    "generate_images",
    "kid",
    "kth_neighbour_distance",
    "load_flux_pipeline",
    "load_lora",
    "load_lora_file",
    "load_synthetic_rows",
    "lora_weights_file",
    "make_embedder",
    "make_extractor",
    "mmd2_unbiased",
    "nearest_neighbour_similarity",
    "paired_change",
    "paired_recall_change",
    "plan_counts",
    "polynomial_kernel",
    "prdc",
    "rare_classes_of",
    "run_finetune_stage",
    "run_synthesis_stage",
    "sample_per_class",
    "stratified_quotas",
    "subsample_train",
    "synth_report",
    "synthesize",
    "synthetic_rows_from_folder",
    "torch_dtype",
]
