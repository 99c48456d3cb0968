"""A tiny random FLUX.1 pipeline built offline (configs as in diffusers' own tests), saved as a diffusers folder.

It stands in for FLUX.1 weights, which are not reachable offline: the demo config, the tests and the benchmarks run
the real code path on it. `python -m pipelines.synthesis.tiny_flux OUT_DIR` writes it; `--base OUT_DIR` then works
exactly like a real FLUX.1 folder. Its images are noise: it checks the machinery, never image quality.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = [
    "CAPTION_WORDS",
    "TINY_IMAGE_SIZE",
    "build_tiny_flux_pipeline",
    "main",
    "save_tiny_flux",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]

log = logging.getLogger(__name__)

# Words of the caption templates, so the tiny T5 tokenizer sees whole words rather than characters.
CAPTION_WORDS = (
    "this photo depicts a an the of on with and in its is are it lesion lesions malignant benign diagnosis "
    "melanoma melanocytic nevus basal cell carcinoma actinic keratosis intraepithelial benign-like keratosis "
    "dermatofibroma vascular located year old male female patient unknown age sex site back trunk abdomen "
    "face scalp neck chest upper lower extremity hand foot ear genital acral asymmetric symmetric along both "
    "one axis axes border regular irregular smooth ragged colour colours shows dermoscopic six white red light "
    "brown dark blue-grey black largest diameter px about pixels index"
).split()
TINY_IMAGE_SIZE = 32


def tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer over printable ASCII characters (no merges), built from an in-code vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        vocab.setdefault(chr(code), len(vocab))
        vocab.setdefault(chr(code) + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer() -> Any:
    """A T5 Unigram tokenizer over the caption words plus single characters, built from an in-code vocabulary."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(code), -6.0) for code in range(33, 127)]
    seen = set()
    for word in CAPTION_WORDS:
        for form in (word, word.capitalize()):
            if form not in seen:
                seen.add(form)
                pieces.append(("▁" + form, -1.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_flux_pipeline(seed: int = 0) -> Any:
    """A FluxPipeline with random tiny components (1+1 transformer blocks, 2-layer text encoders, 2-block VAE)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # like FLUX.1-dev, so the guidance-embedding path is exercised
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        vae=vae,
    )


def save_tiny_flux(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a local diffusers folder (usable as `--base path`)."""
    path = Path(path)
    build_tiny_flux_pipeline(seed).save_pretrained(path)
    log.info("tiny FLUX pipeline written to %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Write the tiny pipeline folder given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the diffusers pipeline into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_tiny_flux(args.out, args.seed)


if __name__ == "__main__":
    main()
