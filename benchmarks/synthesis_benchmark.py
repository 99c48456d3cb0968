"""Measure ABCD/caption speed on real images and the tiny FLUX LoRA fine-tune step time and generation rate.

.venv/bin/python benchmarks/synthesis_benchmark.py ../shared/data/ham10000 --images 200 --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    """Run the measurements and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="HAM10000 root (metadata.csv + images/)")
    parser.add_argument("--images", type=int, default=200, help="real images for the ABCD / caption timing")
    parser.add_argument("--train-images", type=int, default=32, help="captioned images the tiny LoRA trains on")
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps timed")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--generate", type=int, default=16, help="images generated for the images/s figure")
    parser.add_argument("--inference-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image

    from pipelines import synthesis as S
    from pipelines.abcd import abcd_descriptors
    from pipelines.captions import caption_manifest
    from pipelines.manifest import ingest_ham10000
    from pipelines.synthesis.tiny_flux import save_tiny_flux

    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "resolution": args.resolution}
    df = ingest_ham10000(args.data).sample(n=args.images, random_state=0).reset_index(drop=True)
    images = [Image.open(p).convert("RGB") for p in df.path]
    # CPU time per image (process_time), so other jobs on a shared machine do not inflate the figure.
    def cpu_seconds(batch: list[Image.Image]) -> list[float]:
        times = []
        for image in batch:
            start = time.process_time()
            abcd_descriptors(image)
            times.append(time.process_time() - start)
        return times

    results["abcd_cpu_ms_median_full_size"] = 1000 * float(np.median(cpu_seconds(images)))
    small = [im.resize((224, round(224 * im.height / im.width))) for im in images]
    times = cpu_seconds(small)
    results["abcd_cpu_ms_median_224px"] = 1000 * float(np.median(times))
    results["abcd_cpu_ms_p95_224px"] = 1000 * float(np.percentile(times, 95))

    start = time.perf_counter()
    captioned = caption_manifest(df.head(args.train_images).assign(split="train"))
    results["caption_images_per_s"] = args.train_images / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = save_tiny_flux(tmp / "tiny")
        common = {
            "base": str(base),
            "resolution": args.resolution,
            "max_sequence_length": 128,
            "resume": False,
            "checkpointing_steps": 10**9,
        }
        start = time.perf_counter()
        result = S.finetune_lora(captioned, tmp / "lora", S.FinetuneConfig(steps=args.steps, **common))
        results["finetune_total_s"] = time.perf_counter() - start
        results["finetune_s_per_step"] = result.seconds_per_step
        results["finetune_last_loss"] = result.losses[-1]

        pipe = S.load_flux_pipeline(base, lora=result.lora_path)
        settings = S.SynthesisConfig(
            base=str(base),
            lora=str(result.lora_path),
            resolution=args.resolution,
            num_inference_steps=args.inference_steps,
            max_sequence_length=128,
        )
        prompts = captioned.caption.tolist()[: args.generate]
        prompts = (prompts * (args.generate // max(1, len(prompts)) + 1))[: args.generate]
        S.generate_images(pipe, prompts[:1], [0], settings)  # warm-up
        start = time.perf_counter()
        S.generate_images(pipe, prompts, list(range(len(prompts))), settings)
        results["generation_images_per_s"] = len(prompts) / (time.perf_counter() - start)
        results["generation_inference_steps"] = args.inference_steps
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
