"""One YAML file describes a whole run; validated here with pydantic, overridable field by field from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    """Where the images are and how they are laid out."""

    format: Literal["ham10000", "folders", "manifest"] = "ham10000"
    root: str = "data/ham10000_sample"
    metadata: str | None = None
    images: list[str] | None = None
    manifest: str | None = None
    classes: list[str] | None = Field(
        None, description="the expected class names; a label outside them stops ingest (default: the classes found)"
    )
    malignant_classes: list[str] = Field(
        ["mel", "bcc", "akiec"], description="classes counted as malignant; each must be a class of the data"
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

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


class ModelConfig(Section):
    """Which network and how it is initialised."""

    name: str = "efficientnet-lite0"
    img_size: int = 128
    pretrained: bool = True
    checkpoint: str | None = None
    pretrained_path: str | None = Field(
        None, description="model.name=vit: local ImageNet-pretrained ViT weights (a transformers ViT folder or file, "
        "or a timm ViT state dict); the architecture comes from them, the head is new"
    )
    kwargs: dict[str, Any] = {}
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

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 5
    max_steps_per_epoch: int | None = None
    time_budget_minutes: float | None = Field(None, description="stop after the epoch that crosses this budget")
    num_workers: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    loss: Literal["ce", "focal", "logit-adjusted"] = "ce"
    class_weighting: Literal["none", "inverse", "effective"] = "effective"
    effective_beta: float = 0.999
    focal_gamma: float = 2.0
    logit_tau: float = 1.0
    sampler: Literal["none", "balanced", "sqrt"] = "none"
    label_smoothing: float = 0.0
    target_sensitivity: float = 0.9
    cache_images: bool = True
    resume: bool = True
    ema_decay: float = Field(0.998, ge=0.0, lt=1.0, description="EMA of the weights (0 = off); the EMA is shipped")
    schedule_to_budget: bool = Field(
        True, description="with time_budget_minutes: fit the epochs (and the cosine) to the budget after epoch 1"
    )
    channels_last: bool = Field(True, description="channels-last memory layout (faster convolutions on CPU)")
    mixup_alpha: float = Field(0.0, ge=0.0, description="mixup Beta(alpha, alpha) (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="cutmix Beta(alpha, alpha) (0 = off)")
    mix_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of batches mixed when mixup/cutmix is on")
    calibration: Literal["temperature", "vector", "none"] = "temperature"
    tta: Literal[1, 8] = Field(8, description="test-time-augmentation views the bundle is validated and shipped with")


class EvaluationConfig(Section):
    enabled: bool = True


class RunConfig(Section):
    """A whole run: data -> split -> [captions -> LoRA -> synthesis] -> train -> evaluate -> [balance, prune]."""

    run_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    training: TrainSettings = TrainSettings()
    evaluation: EvaluationConfig = EvaluationConfig()
    # Optional stages; each stage module validates its own section with its own pydantic model.
    captions: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    synthesis: dict[str, Any] | None = None
    balancing: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    mil: dict[str, Any] | None = None

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
