"""Tiny offline FLUX chain: caption -> LoRA fine-tune -> save -> reload -> generate -> filtered manifest rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines import synthesis as S
from pipelines.captions import caption_manifest
from pipelines.manifest import ManifestError, grouped_split, ingest_ham10000
from pipelines.provenance import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ham10000_sample"
TINY = {"resolution": 32, "max_sequence_length": 48}


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    """Six images per class from the embedded sample, split by lesion, training rows captioned."""
    df = grouped_split(ingest_ham10000(SAMPLE), seed=0)
    df = df.groupby("label").head(6).reset_index(drop=True)
    return caption_manifest(df, splits=["train"])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.synthesis.tiny_flux import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def finetuned(manifest: pd.DataFrame, base: Path, tmp_path_factory: pytest.TempPathFactory) -> S.FinetuneResult:
    settings = S.FinetuneConfig(base=str(base), steps=3, lr=5e-2, checkpointing_steps=2, **TINY)
    return S.finetune_lora(manifest, tmp_path_factory.mktemp("lora"), settings)


def _generate(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        "This photo depicts a malignant lesion. The diagnosis is melanoma.",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=48,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_tiny_base_is_a_loadable_diffusers_folder(base: Path) -> None:
    assert (base / "model_index.json").is_file() and (base / "tokenizer_2").is_dir()
    pipe = S.load_flux_pipeline(base)
    ids = pipe.tokenizer_2("This photo depicts a malignant lesion.").input_ids
    assert pipe.tokenizer_2.unk_token_id not in ids  # caption words are whole pieces of the in-code vocabulary
    assert _generate(pipe).shape == (1, 3, 32, 32)


def test_finetune_trains_lora_and_saves_diffusers_format(finetuned: S.FinetuneResult) -> None:
    from safetensors.torch import load_file

    assert finetuned.global_step == 3 and len(finetuned.losses) == 3
    assert all(np.isfinite(finetuned.losses))
    assert finetuned.lora_path.name == "pytorch_lora_weights.safetensors"
    keys = list(load_file(finetuned.lora_path))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("ff.net.0.proj.lora_A" in k for k in keys) and any("attn.to_q.lora_B" in k for k in keys)
    assert (finetuned.lora_path.parent / "checkpoints" / "checkpoint-3").is_dir()
    card = json.loads((finetuned.lora_path.parent / "lora_card.json").read_text())
    assert card["lora_sha256"] == file_sha256(finetuned.lora_path)


def test_lora_reload_reproduces_finetuned_outputs_and_unload_restores_base(
    finetuned: S.FinetuneResult, base: Path
) -> None:
    from diffusers import FluxPipeline

    pipe = S.load_flux_pipeline(base)
    base_out = _generate(pipe)
    trained = FluxPipeline(**{**pipe.components, "transformer": finetuned.transformer.eval()})
    trained.set_progress_bar_config(disable=True)
    trained_out = _generate(trained)

    fresh = S.load_flux_pipeline(base, lora=finetuned.lora_path)
    loaded_out = _generate(fresh)
    assert (trained_out - base_out).abs().max() > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded_out, trained_out, rtol=0, atol=1e-6)
    fresh.unload_lora_weights()
    torch.testing.assert_close(_generate(fresh), base_out, rtol=0, atol=0)


def test_finetune_resumes_from_its_last_checkpoint(manifest: pd.DataFrame, base: Path, tmp_path: Path) -> None:
    settings = S.FinetuneConfig(base=str(base), steps=2, lr=5e-2, checkpointing_steps=1, **TINY)
    first = S.finetune_lora(manifest, tmp_path, settings)
    resumed = S.finetune_lora(manifest, tmp_path, settings.model_copy(update={"steps": 3}))
    assert resumed.global_step == 3
    assert resumed.losses[:2] == first.losses and len(resumed.losses) == 3


def test_finetune_refuses_uncaptioned_manifest(manifest: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="lesionlab caption"):
        S.finetune_lora(manifest.drop(columns="caption"), tmp_path, S.FinetuneConfig(base="unused"))


def test_plan_counts_reaches_the_ratio_of_the_largest_class() -> None:
    df = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 2 + ["c"] * 5 + ["b"] * 4, "split": ["train"] * 17 + ["val"] * 4})
    assert S.plan_counts(df, 0.5) == {"b": 3}
    assert S.plan_counts(df, 1.0, max_per_class=4) == {"b": 4, "c": 4}
    with pytest.raises(ValueError, match="no training images"):
        S.plan_counts(df, 0.5, classes=["zzz"])


def test_generation_writes_requested_counts_in_train_only(
    manifest: pd.DataFrame, base: Path, finetuned: S.FinetuneResult, tmp_path: Path
) -> None:
    settings = S.SynthesisConfig(
        base=str(base), lora=str(finetuned.lora_path), num_inference_steps=2, min_ratio=1.0, max_per_class=2, **TINY
    )
    plan = S.plan_counts(manifest, 1.0, max_per_class=2)
    out, report = S.synthesize(manifest, tmp_path, settings)
    synthetic = out[out.source == "synthetic"]
    assert synthetic.label.value_counts().to_dict() == plan
    assert (synthetic.split == "train").all()
    assert all(Path(p).is_file() and Image.open(p).size == (32, 32) for p in synthetic.path)
    assert (synthetic.lora_sha256 == file_sha256(finetuned.lora_path)).all()
    assert synthetic.seed.nunique() == len(synthetic) and synthetic.prompt.str.startswith("This photo").all()
    original = out[out.source == "real"].drop(columns=[c for c in out.columns if c not in manifest.columns])
    pd.testing.assert_frame_equal(original.reset_index(drop=True), manifest.reset_index(drop=True), check_dtype=False)
    assert (synthetic.malignant == synthetic.label.isin(["mel", "bcc", "akiec"])).all()
    saved = json.loads((tmp_path / "synthesis_report.json").read_text())
    assert saved["totals"]["accepted"] == sum(plan.values()) == report.to_dict()["totals"]["accepted"]
    # Fixed seeds: generating again gives the same images.
    again, _ = S.synthesize(manifest, tmp_path / "again", settings)
    first, second = synthetic.path.iloc[0], again[again.source == "synthetic"].path.iloc[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_memorisation_guard_drops_an_exact_copy(manifest: pd.DataFrame) -> None:
    train = manifest[manifest.split == "train"]
    guard = S.MemorisationGuard(threshold=0.95).fit(train.path.tolist())
    copy = Image.open(train.path.iloc[0]).convert("RGB")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    keep, sims = guard.keep([copy, noise])
    assert keep.tolist() == [False, True]
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] < 0.5


def test_synthesis_reports_what_the_guard_dropped(manifest: pd.DataFrame, tmp_path: Path) -> None:
    """A 'generator' that returns a training image is caught on every attempt and reported."""
    copy = Image.open(manifest[manifest.split == "train"].path.iloc[0]).convert("RGB").resize((32, 32))

    class CopyingPipe:
        vae_scale_factor = 2

        def __call__(self, prompt: list[str], **_: object) -> SimpleNamespace:
            return SimpleNamespace(images=[copy] * len(prompt))

    settings = S.SynthesisConfig(base="unused", max_rounds=2, **TINY)
    out, report = S.synthesize(manifest, tmp_path, settings, pipe=CopyingPipe(), counts={"df": 2})
    assert (out.source == "synthetic").sum() == 0
    assert report.per_class["df"] == {
        "real": int(((manifest.split == "train") & (manifest.label == "df")).sum()),
        "requested": 2,
        "generated": 4,
        "dropped_memorisation": 4,
        "dropped_quality": 0,
        "accepted": 0,
    }


def test_existing_synthetic_folder_is_added_to_train_only(manifest: pd.DataFrame, tmp_path: Path) -> None:
    for label in ("mel", "df"):
        (tmp_path / label).mkdir()
        for i in range(2):
            array = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / label / f"{label}_{i}.png")
    rows = S.synthetic_rows_from_folder(tmp_path)
    out, stats = S.add_synthetic_folder(manifest, rows, S.MemorisationGuard())
    added = out.iloc[len(manifest) :]
    assert len(added) == 4 and (added.split == "train").all() and (added.source == "synthetic").all()
    assert stats == {"df": {"offered": 2, "dropped_memorisation": 0}, "mel": {"offered": 2, "dropped_memorisation": 0}}
    with pytest.raises(ValueError, match="not in the manifest"):
        S.add_synthetic_folder(manifest, rows.assign(label="unknown-class"))
