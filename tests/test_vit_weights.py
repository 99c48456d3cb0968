"""Pretrained ViT weights (transformers and timm layouts) load into the registry's ViT and compute the same function."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.bundle import load_bundle, save_bundle
from models.registry import architecture_kwargs, build_model
from models.vit_weights import transformers_to_timm
from pipelines.config import ConfigError, load_config

transformers = pytest.importorskip("transformers")

SIZE = 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A small randomly initialised transformers ViT classifier and the folder save_pretrained wrote it to."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=8, image_size=SIZE, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02); widen it so the comparison is not trivially small
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder)
    return model, folder


def _ours(path: Path, reference_model: torch.nn.Module, size: int = SIZE, **kwargs) -> torch.nn.Module:
    model = build_model("vit", 3, size, pretrained_path=path, **kwargs).eval()
    model.head.load_state_dict({"weight": reference_model.classifier.weight, "bias": reference_model.classifier.bias})
    return model


def _images(size: int = SIZE) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_transformers_folder_gives_identical_features_and_logits(reference) -> None:
    hf, folder = reference
    ours = _ours(folder, hf)
    x = _images()
    expected_features = hf.vit(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(ours.forward_features(x), expected_features, atol=1e-5)
    assert torch.allclose(ours(x), hf(pixel_values=x).logits, atol=1e-5)
    assert ours.backbone.vit.blocks[0].norm1.eps == 1e-12 and len(ours.backbone.vit.blocks) == 2


@torch.no_grad()
def test_vitmodel_safetensors_and_bin_files_load_the_same_backbone(reference, tmp_path: Path) -> None:
    hf, folder = reference
    bare = transformers.ViTModel(hf.config)  # ViTModel layout: no "vit." prefix, a pooler instead of a classifier
    bare.load_state_dict(hf.vit.state_dict(), strict=False)
    bare.save_pretrained(tmp_path / "vitmodel")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    x = _images()
    expected = hf(pixel_values=x).logits
    for path in (tmp_path / "vitmodel", tmp_path / "bin" / "pytorch_model.bin"):
        assert torch.allclose(_ours(path, hf)(x), expected, atol=1e-5), path


@torch.no_grad()
def test_timm_layout_state_dict_gives_the_same_logits(reference, tmp_path: Path) -> None:
    hf, folder = reference
    state, left_out, unknown = transformers_to_timm(load_file(folder / "model.safetensors"))
    assert not unknown and left_out == ["classifier.bias", "classifier.weight"]
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 32), torch.zeros(1000)  # an ImageNet head: left out
    save_file(state, tmp_path / "vit_tiny_test.safetensors")
    # A timm file does not record heads or layer-norm epsilon; this one was made from a transformers ViT.
    ours = _ours(tmp_path / "vit_tiny_test.safetensors", hf, num_heads=2, layer_norm_eps=1e-12)
    x = _images()
    assert torch.allclose(ours(x), hf(pixel_values=x).logits, atol=1e-5)


@torch.no_grad()
def test_position_embeddings_are_interpolated_for_another_image_size(reference, caplog) -> None:
    hf, folder = reference
    with caplog.at_level(logging.INFO, logger="models.vit_weights"):
        ours = _ours(folder, hf, size=64)
    assert "interpolated (bicubic) from 4x4 to 8x8 patches" in caplog.text
    x = _images(64)
    assert torch.allclose(ours(x), hf(pixel_values=x, interpolate_pos_encoding=True).logits, atol=1e-5)


@torch.no_grad()
def test_bundle_of_a_pretrained_vit_rebuilds_without_the_weights_file(reference, tmp_path: Path) -> None:
    hf, folder = reference
    ours = _ours(folder, hf)
    kwargs = architecture_kwargs(ours, {})
    assert kwargs["pool"] == "cls" and kwargs["hidden_size"] == 32 and "pretrained_path" not in kwargs
    card = {"architecture": {"name": "vit", "kwargs": kwargs}, "class_names": ["a", "b", "c"], "input_size": SIZE,
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_bundle(tmp_path / "bundle", ours, card)
    x = _images()
    assert torch.allclose(load_bundle(tmp_path / "bundle").model.eval()(x), ours(x), atol=1e-6)


def _one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        build_model("vit", 3, SIZE, pretrained_path=path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_wrong_shapes_and_unexpected_or_missing_keys_are_refused_by_name(reference, tmp_path: Path) -> None:
    _, folder = reference
    state = load_file(folder / "model.safetensors")
    config = (folder / "config.json").read_text()

    def variant(name: str, changed: dict[str, torch.Tensor]) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        save_file(changed, tmp_path / name / "model.safetensors")
        return tmp_path / name

    fc1 = "vit.encoder.layer.1.intermediate.dense.weight"
    message = _one_line_error(variant("shape", {**state, fc1: torch.zeros(48, 32)}))
    assert fc1 in message and "(48, 32)" in message and "(64, 32)" in message
    rotary = "vit.encoder.layer.0.attention.attention.rotary.weight"
    message = _one_line_error(variant("extra", {**state, rotary: torch.zeros(4)}))
    assert rotary in message and "does not have" in message
    fewer = {k: v for k, v in state.items() if ".layer.1.layernorm_after." not in k}
    message = _one_line_error(variant("missing", fewer))
    assert "vit.encoder.layer.1.layernorm_after.bias" in message
    wider = json.loads(config) | {"hidden_size": 48, "num_attention_heads": 3}
    (tmp_path / "wider").mkdir()
    (tmp_path / "wider" / "config.json").write_text(json.dumps(wider))
    save_file(state, tmp_path / "wider" / "model.safetensors")
    message = _one_line_error(tmp_path / "wider")
    assert "vit.embeddings.cls_token (1, 1, 32) (expected (1, 1, 48))" in message
    save_file({"features.0.weight": torch.zeros(3)}, tmp_path / "resnet.safetensors")
    assert "features.0.weight" in _one_line_error(tmp_path / "resnet.safetensors")
    timm = {"cls_token": torch.zeros(1, 1, 32), "pos_embed": torch.zeros(1, 17, 32),
            "patch_embed.proj.weight": torch.zeros(32, 3, 8, 8), "blocks.0.mlp.fc1.weight": torch.zeros(64, 32),
            "blocks.0.ls1.gamma": torch.zeros(32)}
    save_file(timm, tmp_path / "layerscale.safetensors")
    assert "blocks.0.ls1.gamma" in _one_line_error(tmp_path / "layerscale.safetensors", num_heads=2)


def test_kwargs_that_contradict_the_weights_and_non_vit_models_are_refused(reference) -> None:
    _, folder = reference
    assert "hidden_size=192" in _one_line_error(folder, hidden_size=192)
    with pytest.raises(ValueError, match="loads ViT weights"):
        build_model("small-cnn", 3, SIZE, pretrained_path=folder)
    with pytest.raises(ConfigError, match="model.pretrained_path loads ViT weights"):
        load_config(None, ["model.name=efficientnet-lite0", f"model.pretrained_path={folder}"])
    assert load_config(None, ["model.name=vit", f"model.pretrained_path={folder}"]).model.pretrained_path == str(folder)
