"""The whole DermaFlux chain through `lesionlab run`: caption -> LoRA fine-tune -> synthesize -> train -> prune."""

from __future__ import annotations

import json

import pandas as pd
import torch
import yaml

from pipelines.cli import main


def test_caption_finetune_synthesize_train_prune_in_one_run(small_manifest, tmp_path):
    from pipelines.synthesis.tiny_flux import save_tiny_flux

    torch.set_num_threads(1)  # tiny FLUX steps are faster single-threaded on 2 cores
    base = save_tiny_flux(tmp_path / "tiny_flux")
    # Make df and vasc rare (4 training images against 12) so that synthesis has classes to top up.
    df = pd.read_csv(small_manifest, keep_default_na=False)
    rare = df[(df.split == "train") & df.label.isin(["df", "vasc"])].groupby("label").tail(8).index
    imbalanced = tmp_path / "imbalanced.csv"
    df.drop(rare).to_csv(imbalanced, index=False)
    run_dir = tmp_path / "run"
    config = {
        "run_dir": str(run_dir),
        "data": {"format": "manifest", "manifest": str(imbalanced)},
        "captions": {"splits": ["train"]},
        "lora": {"base": str(base), "steps": 2, "resolution": 32, "max_sequence_length": 32,
                 "checkpointing_steps": 2},
        "synthesis": {"base": str(base), "min_ratio": 0.5, "max_per_class": 2, "resolution": 32,
                      "num_inference_steps": 2, "max_sequence_length": 32},
        "model": {"name": "small-cnn", "img_size": 32, "pretrained": False, "kwargs": {"widths": [8]}},
        "training": {"epochs": 1, "batch_size": 16, "device": "cpu"},
        "pruning": {"method": "beta-rank", "flops_reduction": 0.3, "steps": 1, "fine_tune_epochs": 1,
                    "max_steps_per_epoch": 1, "calibration_per_class": 2, "batchnorm_images": 8, "speed_runs": 2,
                    "round_to": 1, "distill_weight": 1.0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0

    stages = {p.stem for p in (run_dir / "stages").glob("*.json")}
    assert stages == {"ingest", "captions", "lora", "synthesis", "train", "pruning"}
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    manifest = pd.read_csv(run_dir / "manifest_synthetic.csv", keep_default_na=False)
    synthetic = manifest[manifest.source == "synthetic"]
    assert set(synthetic.label) == {"df", "vasc"} and set(synthetic.split) == {"train"}
    assert synthetic.groupby("label").size().max() <= 2
    assert (synthetic.prompt.str.len() > 0).all()
    card = json.loads((run_dir / "bundle" / "card.json").read_text())
    counts = card["training"]["train_counts"]
    assert sum(c["synthetic"] for c in counts.values()) == len(synthetic)  # trained on real + synthetic rows
    assert card["training"]["images"] == (manifest.split == "train").sum()
    report = (run_dir / "report" / "report.md").read_text()
    assert "| class | real | synthetic |" in report
    # the pruning stage: a smaller bundle that loads like any other, with its report
    from models import load_bundle
    from pipelines.pruning import count_flops

    pruned = load_bundle(run_dir / "bundle_pruned")
    prune_report = json.loads((run_dir / "bundle_pruned" / "pruning_report.json").read_text())
    assert prune_report["settings"]["distill_weight"] == 1.0
    assert count_flops(pruned.model, 32) == prune_report["after"]["flops"] < 0.75 * prune_report["before"]["flops"]
    assert pruned.card["pruning"]["method"] == "beta-rank"
    # The pruned net is scored and calibrated as itself; the unpruned numbers are kept apart.
    assert pruned.card["calibration"]["fitted_on"].startswith("validation")
    assert set(pruned.card["metrics"]) == {"validation", "test"}
    assert {k: pruned.card["source_metrics"][k] for k in ("validation", "test")} == {
        k: card["metrics"][k] for k in ("validation", "test")}
    assert pruned.card["metrics"]["validation"] != card["metrics"]["validation"]
    assert (run_dir / "bundle_pruned" / "pruning_report.md").is_file()
