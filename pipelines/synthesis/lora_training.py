"""LoRA fine-tuning of FLUX.1 on captioned real training images (diffusers + peft + Accelerate), step by step.

Follows diffusers' `train_dreambooth_lora_flux.py`: LoRA (gaussian init) on the transformer's attention and
feed-forward projections, the rectified-flow objective (x_t = (1 - s) x_0 + s e, target e - x_0) with SD3/Flux
timestep densities and loss weightings and the guidance embedding, cached latents and prompt embeddings, and
LoRA-only Accelerate checkpoints for resuming. The steps: `encode_training_data` (latents and captions, once),
`prepare_lora_training` (adapter, optimizer, checkpoint hooks), `sample_noisy_batch` (noise and timesteps),
`training_step` (one optimisation step), `save_checkpoint` / `resume_training` and `save_lora`; `finetune_lora`
is the loop over them.

References:
    Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis. ICML 2024 (the
    rectified-flow objective, section 3; logit-normal, mode and cosmap timestep densities, section 3.1).
    Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.config import FinetuneConfig
from pipelines.manifest import ManifestError
from pipelines.provenance import file_sha256
from pipelines.synthesis.flux import (
    LORA_WEIGHTS_NAME,
    check_resolution,
    fit_captions_to_pipe,
    torch_dtype,
)

__all__ = [
    "LORA_TARGET_MODULES",
    "FinetuneResult",
    "NoiseSchedule",
    "NoisyBatch",
    "TrainingData",
    "encode_training_data",
    "finetune_lora",
    "image_pixels",
    "latest_checkpoint",
    "prepare_lora_training",
    "resume_training",
    "sample_noisy_batch",
    "save_checkpoint",
    "save_lora",
    "training_rows",
    "training_step",
]

log = logging.getLogger(__name__)

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


@dataclass
class FinetuneResult:
    """What `finetune_lora` produced: the LoRA file, the step reached, the loss per step and the trained model."""

    lora_path: Path
    global_step: int
    losses: list[float] = field(default_factory=list)
    transformer: Any = None
    seconds_per_step: float | None = None  # wall time of this invocation's optimisation steps


@dataclass
class TrainingData:
    """The training images' VAE latent distributions and their captions' embeddings, computed once (on the CPU)."""

    moments: Any  # (N, 2 x latent channels, h, w): mean and log-variance of each image's latent distribution
    prompt_embeds: Any  # (N, T5 tokens, width)
    pooled_embeds: Any  # (N, CLIP projection width)
    text_ids: Any  # (T5 tokens, 3), on the training device


@dataclass
class NoiseSchedule:
    """What a training step needs from the VAE config and the flow-matching scheduler."""

    sigmas: Any  # the scheduler's sigmas, on the training device
    num_train_timesteps: int
    shift: float
    scaling: float
    vae_scale_factor: int


@dataclass
class NoisyBatch:
    """One batch of the rectified-flow objective: which images, their clean latents, the noise and each sigma."""

    index: Any  # (B,) rows of the TrainingData
    model_input: Any  # (B, C, h, w) scaled clean latents x_0
    noise: Any  # (B, C, h, w) e
    sigmas: Any  # (B, 1, 1, 1) s


def training_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's real, captioned split=train rows; raises ManifestError when there are none or one lacks a
    caption."""
    rows = manifest[(manifest.split == "train") & (manifest.source == "real")]
    if rows.empty:
        raise ManifestError("the manifest has no real rows in split=train to fine-tune on")
    if "caption" not in rows.columns or (rows.caption.astype(str).str.strip() == "").any():
        raise ManifestError("training rows need a `caption`; run `lesionlab caption` on the manifest first")
    return rows


def image_pixels(image: Image.Image, resolution: int) -> Any:
    """Resize the shorter side to `resolution`, centre-crop a square, scale to [-1, 1], CHW float tensor."""
    import torch

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


def _load_frozen_pipeline(settings: FinetuneConfig, device: Any, dtype: Any) -> Any:
    """The base FluxPipeline on `device`, every component frozen."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(settings.base, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    check_resolution(pipe, settings.resolution)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pipe.to(device)
    return pipe


def encode_training_data(pipe: Any, rows: pd.DataFrame, settings: FinetuneConfig, accelerator: Any,
                         dtype: Any) -> TrainingData:
    """Encode every training image with the VAE and every caption (fitted to the encoders) with CLIP and T5."""
    import torch
    from tqdm import tqdm

    from pipelines.images import load_image

    moments, prompt_embeds, pooled_embeds = [], [], []
    captions = fit_captions_to_pipe(pipe, rows.caption.astype(str).tolist(), settings.max_sequence_length)
    device = accelerator.device
    with torch.no_grad():
        pairs = zip(rows.path, captions, strict=True)
        quiet = not accelerator.is_local_main_process
        for path, caption in tqdm(pairs, total=len(rows), desc="caching", disable=quiet):
            pixels = image_pixels(load_image(path), settings.resolution)[None].to(device, dtype)
            moments.append(pipe.vae.encode(pixels).latent_dist.parameters.cpu())
            embeds, pooled, text_ids = pipe.encode_prompt(
                caption, prompt_2=None, device=device, max_sequence_length=settings.max_sequence_length
            )
            prompt_embeds.append(embeds.cpu())
            pooled_embeds.append(pooled.cpu())
    return TrainingData(torch.cat(moments), torch.cat(prompt_embeds), torch.cat(pooled_embeds), text_ids.to(device))


def _noise_schedule(pipe: Any, device: Any) -> NoiseSchedule:
    """The sigmas of a fresh copy of the pipeline's scheduler and the VAE's latent shift and scale."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return NoiseSchedule(scheduler.sigmas.to(device), scheduler.config.num_train_timesteps,
                         pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor, pipe.vae_scale_factor)


def _register_checkpoint_hooks(accelerator: Any, lora_config: Any, mixed_precision: str) -> None:
    """Make Accelerate checkpoints hold the LoRA weights only (diffusers' format), and load them back."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

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
        if mixed_precision != "no":
            cast_training_params([model], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def prepare_lora_training(transformer: Any, settings: FinetuneConfig, accelerator: Any) -> tuple[Any, Any, list, Any]:
    """Add the LoRA adapter to the frozen transformer, build AdamW over its weights, prepare both with Accelerate and
    register the LoRA-only checkpoint hooks; returns (transformer, optimizer, trained parameters, LoRA config)."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

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
    _register_checkpoint_hooks(accelerator, lora_config, settings.mixed_precision)
    return transformer, optimizer, params, lora_config


def _step_generator(seed: int, global_step: int, accelerator: Any) -> Any:
    """The generator of one step's batch and noise."""
    import torch

    # Batches and noise depend only on (seed, step, process), so a resumed run continues exactly.
    return torch.Generator().manual_seed(seed * 1_000_003 + global_step * accelerator.num_processes
                                         + accelerator.process_index)


def sample_noisy_batch(data: TrainingData, schedule: NoiseSchedule, settings: FinetuneConfig, generator: Any,
                       device: Any, dtype: Any) -> NoisyBatch:
    """Draw a batch of images, a latent from each one's distribution, the noise, and a sigma per image from the
    timestep density `settings.weighting_scheme` (Esser et al. 2024, section 3.1), all from `generator`."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    index = torch.randint(len(data.moments), (settings.batch_size,), generator=generator)
    mean, logvar = data.moments[index].chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    model_input = ((latents - schedule.shift) * schedule.scaling).to(device, dtype)
    noise = torch.randn(model_input.shape, generator=generator).to(device, dtype)
    u = compute_density_for_timestep_sampling(
        settings.weighting_scheme,
        len(index),
        settings.logit_mean,
        settings.logit_std,
        settings.mode_scale,
        generator=generator,
    )
    last = schedule.num_train_timesteps - 1
    step_index = (u * schedule.num_train_timesteps).long().clamp(max=last).to(device)
    sigmas = schedule.sigmas[step_index].to(dtype).view(-1, 1, 1, 1)
    return NoisyBatch(index, model_input, noise, sigmas)


def _flow_matching_loss(transformer: Any, batch: NoisyBatch, data: TrainingData, schedule: NoiseSchedule,
                        settings: FinetuneConfig, accelerator: Any, dtype: Any) -> Any:
    """Weighted MSE between the transformer's velocity and the target e - x_0 at x_t = (1 - s) x_0 + s e."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    device = accelerator.device
    model_input, noise, sigmas = batch.model_input, batch.noise, batch.sigmas
    bsz, channels, height, width = model_input.shape
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
    guidance = None
    if accelerator.unwrap_model(transformer).config.guidance_embeds:
        guidance = torch.full((bsz,), settings.guidance_scale, device=device, dtype=torch.float32)
    pred = transformer(
        hidden_states=packed,
        timestep=sigmas.flatten(),  # Flux takes t / 1000 = sigma
        guidance=guidance,
        pooled_projections=data.pooled_embeds[batch.index].to(device, dtype),
        encoder_hidden_states=data.prompt_embeds[batch.index].to(device, dtype),
        txt_ids=data.text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    factor = schedule.vae_scale_factor
    pred = FluxPipeline._unpack_latents(pred, height * factor, width * factor, factor)
    weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)
    target = noise - model_input
    return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()


def training_step(transformer: Any, optimizer: Any, params: list, batch: NoisyBatch, data: TrainingData,
                  schedule: NoiseSchedule, settings: FinetuneConfig, accelerator: Any, dtype: Any) -> float:
    """One optimisation step (with gradient clipping) on `batch`; returns the loss averaged over processes."""
    with accelerator.accumulate(transformer):
        loss = _flow_matching_loss(transformer, batch, data, schedule, settings, accelerator, dtype)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return float(accelerator.gather(loss.detach()).mean())


def latest_checkpoint(folder: Path) -> Path | None:
    """The `checkpoint-<step>` folder with the highest step, or None."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator: Any, folder: Path, step: int, losses: list[float], keep: int) -> None:
    """Accelerate state (LoRA, optimizer, RNG) written to a temp folder then renamed, so a kill never half-writes;
    only the newest `keep` checkpoints are kept."""
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


def resume_training(accelerator: Any, folder: Path) -> tuple[int, list[float]]:
    """Load the latest checkpoint in `folder` into the prepared objects; (its step, the losses so far), or (0, [])."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return 0, []
    accelerator.load_state(str(latest))
    global_step = int(latest.name.split("-")[1])
    losses = json.loads((latest / "losses.json").read_text()) if (latest / "losses.json").is_file() else []
    log.info("resumed LoRA fine-tuning from %s (step %d)", latest, global_step)
    return global_step, losses


def save_lora(accelerator: Any, transformer: Any, lora_config: Any, out_dir: Path, settings: FinetuneConfig,
              train_images: int, global_step: int, losses: list[float]) -> Path:
    """Write the LoRA in diffusers' format (`pytorch_lora_weights.safetensors`) and `lora_card.json` (base,
    settings, images, step, last loss, file hash) into `out_dir`; returns the LoRA file's path."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    accelerator.wait_for_everyone()
    lora_path = out_dir / LORA_WEIGHTS_NAME
    if accelerator.is_main_process:
        state = get_peft_model_state_dict(accelerator.unwrap_model(transformer))
        lora_layers = {k: v.detach().to("cpu") for k, v in state.items()}
        FluxPipeline.save_lora_weights(
            out_dir, transformer_lora_layers=lora_layers, transformer_lora_adapter_metadata=lora_config.to_dict()
        )
        card = {
            "base": str(settings.base),
            "settings": settings.model_dump(),
            "train_images": train_images,
            "global_step": global_step,
            "final_loss": losses[-1] if losses else None,
            "lora_sha256": file_sha256(lora_path),
        }
        (out_dir / "lora_card.json").write_text(json.dumps(card, indent=2))
        log.info("LoRA saved to %s after %d steps", lora_path, global_step)
    accelerator.wait_for_everyone()
    return lora_path


def finetune_lora(manifest: pd.DataFrame, out_dir: str | Path, settings: FinetuneConfig) -> FinetuneResult:
    """LoRA fine-tune FLUX.1 on the manifest's captioned real training images; saves diffusers' LoRA format and
    resumes from the latest checkpoint in `out_dir/checkpoints` when `settings.resume`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    rows = training_rows(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    set_seed(settings.seed)
    dtype = torch_dtype(settings.mixed_precision)
    pipe = _load_frozen_pipeline(settings, accelerator.device, dtype)
    data = encode_training_data(pipe, rows, settings, accelerator, dtype)
    schedule = _noise_schedule(pipe, accelerator.device)
    transformer = pipe.transformer
    pipe.vae, pipe.text_encoder, pipe.text_encoder_2 = None, None, None  # free memory for training
    transformer, optimizer, params, lora_config = prepare_lora_training(transformer, settings, accelerator)

    checkpoints = out_dir / "checkpoints"
    global_step, losses = resume_training(accelerator, checkpoints) if settings.resume else (0, [])
    transformer.train()
    progress = tqdm(
        total=settings.steps, initial=global_step, desc="LoRA", disable=not accelerator.is_local_main_process
    )
    first_step, loop_start = global_step, time.perf_counter()
    while global_step < settings.steps:
        generator = _step_generator(settings.seed, global_step, accelerator)
        batch = sample_noisy_batch(data, schedule, settings, generator, accelerator.device, dtype)
        losses.append(training_step(transformer, optimizer, params, batch, data, schedule, settings, accelerator,
                                    dtype))
        global_step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if global_step % settings.checkpointing_steps == 0 or global_step == settings.steps:
            save_checkpoint(accelerator, checkpoints, global_step, losses, settings.checkpoints_total_limit)
    progress.close()
    seconds_per_step = (time.perf_counter() - loop_start) / max(1, global_step - first_step)

    lora_path = save_lora(accelerator, transformer, lora_config, out_dir, settings, len(rows), global_step, losses)
    return FinetuneResult(lora_path, global_step, losses, accelerator.unwrap_model(transformer), seconds_per_step)
