"""predict's exit code when nothing was predicted, integer synthesis seeds, captions fitted to the text encoders once,
and logging once per multi-process run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines import synthesis as S
from pipelines.captions import caption_manifest
from pipelines.cli import default_bundle_path, main, setup_logging
from pipelines.manifest import grouped_split, ingest_ham10000, write_manifest

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "ham10000_sample"
TINY = {"resolution": 32, "max_sequence_length": 48}


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    """Two images per class from the embedded sample, split by lesion, training rows captioned."""
    df = grouped_split(ingest_ham10000(SAMPLE), seed=0)
    df = df.groupby("label").head(2).reset_index(drop=True)
    return caption_manifest(df, splits=["train"])


def test_predict_exits_2_with_one_line_when_every_file_is_skipped(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "preds.csv"
    code = main(["predict", "--bundle", str(default_bundle_path()), "--images", str(folder), "--out", str(out)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "lesionlab predict: error:" in line]
    assert len(errors) == 1 and "all 2 files" in errors[0] and "were skipped" in errors[0]
    assert not out.exists()


def test_synthetic_seed_column_is_written_as_integers(manifest: pd.DataFrame, tmp_path: Path) -> None:
    class NoisePipe:
        vae_scale_factor = 2

        def __call__(self, prompt: list[str], generator: list[torch.Generator], **_: object) -> SimpleNamespace:
            images = [np.random.default_rng(g.initial_seed()).integers(0, 255, (32, 32, 3), dtype=np.uint8)
                      for g in generator]
            return SimpleNamespace(images=[Image.fromarray(a) for a in images])

    settings = S.SynthesisConfig(base="unused", **TINY)
    out, _ = S.synthesize(manifest, tmp_path / "synthesis", settings, pipe=NoisePipe(), counts={"df": 2})
    write_manifest(out, tmp_path / "manifest_synthetic.csv")
    seeds = pd.read_csv(tmp_path / "manifest_synthetic.csv", dtype=str, keep_default_na=False)
    synthetic = seeds[seeds.source == "synthetic"].seed.tolist()
    assert len(synthetic) == 2 and all(s.isdigit() for s in synthetic), synthetic  # not "1000000.0"
    assert (seeds[seeds.source == "real"].seed == "").all()


def test_fit_caption_keeps_the_longest_word_prefix_that_fits() -> None:
    from pipelines.synthesis.tiny_flux import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()  # one token per character, plus start and end
    caption = "This photo depicts a malignant lesion on the back of a 60 year old male patient " * 2
    fitted = S.fit_caption(caption, tokenizer, 77)
    assert caption.startswith(fitted) and len(tokenizer(fitted).input_ids) <= 77
    longer = " ".join(caption.split()[: len(fitted.split()) + 1])
    assert len(tokenizer(longer).input_ids) > 77
    assert S.fit_caption("short one", tokenizer, 77) == "short one"


def test_lora_finetune_fits_captions_once_without_encoder_warnings(manifest: pd.DataFrame, tmp_path: Path,
                                                                   caplog) -> None:
    from pipelines.synthesis.tiny_flux import save_tiny_flux

    base = save_tiny_flux(tmp_path / "tiny_flux")
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # diffusers' loggers do not propagate
    handler.setLevel(logging.WARNING)
    diffusers_log = logging.getLogger("diffusers")
    diffusers_log.addHandler(handler)
    settings = S.FinetuneConfig(base=str(base), steps=1, checkpointing_steps=10, **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="pipelines.synthesis"):
            S.finetune_lora(manifest, tmp_path / "lora", settings)
    finally:
        diffusers_log.removeHandler(handler)
        torch.set_num_threads(threads)
    assert not [w for w in warnings if "truncated" in w], warnings[:1]
    summaries = [r.getMessage() for r in caplog.records if "captions are longer" in r.getMessage()]
    n_train = int((manifest.split == "train").sum())
    assert len(summaries) == 1 and summaries[0].endswith(f"of {n_train} captions are longer than the text encoders "
                                                         "take (77 / 48 tokens) and were cut at a word boundary to fit")


@pytest.fixture
def restore_logging():
    root, noisy = logging.getLogger(), logging.getLogger("accelerate")
    levels = root.level, noisy.level
    yield
    root.setLevel(levels[0])
    noisy.setLevel(levels[1])


def test_only_the_main_process_logs_progress(restore_logging, monkeypatch) -> None:
    log = logging.getLogger("lesionlab")
    setup_logging(verbose=False, rank=1)
    assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
    setup_logging(verbose=False, rank=0)
    assert log.isEnabledFor(logging.INFO)
    monkeypatch.setenv("RANK", "3")  # as `accelerate launch` / torchrun set it on the fourth process
    setup_logging(verbose=True)
    assert not log.isEnabledFor(logging.INFO)
    monkeypatch.setenv("RANK", "0")
    setup_logging(verbose=True)
    assert log.isEnabledFor(logging.DEBUG)


def test_scoring_a_model_leaves_it_trainable():
    """Scoring converts the layout to channels-last and back; done under inference mode, that turned the
    convolution weights into inference tensors, and the next training step failed."""
    import torch
    from torch.utils.data import TensorDataset

    from models.registry import build_model
    from pipelines.ood import dataset_features
    from pipelines.prediction import dataset_logits

    model = build_model("small-cnn", 3, 32, pretrained=False, widths=[8, 16])
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    dataset_logits(model, data, 8)
    dataset_features(model, data)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
