"""Model registry, ImageNet EfficientNet-Lite loading and bundle round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from models.bundle import load_bundle, save_bundle
from models.efficientnet import (
    build_efficientnet_lite,
    lite_checkpoint_path,
    lukemelas_to_monai,
    verify_sha256_prefix,
)
from models.registry import available_models, build_model


@pytest.mark.parametrize(
    "name,size", [("vit", 64), ("efficientnet-b0", 64), ("small-cnn", 48), ("efficientnet-lite1", 64)]
)
def test_registry_builds_plain_logit_classifiers(name, size):
    model = build_model(name, num_classes=5, img_size=size, pretrained=False).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
        features = model.forward_features(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 5)
    assert features.shape == (2, model.head.in_features)
    assert not torch.allclose(logits.softmax(-1).sum(-1), logits.sum(-1))  # logits, not probabilities


def test_unknown_model_and_bad_vit_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_model("vit", 3, img_size=100)
    assert {"efficientnet-lite0", "efficientnet-b7", "vit", "small-cnn"} <= set(available_models())


def test_lite0_imagenet_checkpoint_is_verified_and_loads_every_key_strictly():
    path = lite_checkpoint_path("efficientnet-lite0")
    verify_sha256_prefix(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = build_efficientnet_lite("efficientnet-lite0")
    renamed = lukemelas_to_monai(state, net)
    net.load_state_dict(renamed, strict=True)
    assert len(renamed) == len(state) == len(net.state_dict())
    assert torch.equal(net._conv_stem.weight, state["_conv_stem.weight"])
    assert isinstance(net._swish, torch.nn.ReLU6)
    assert not any("_se_" in k for k in state)  # Lite has no squeeze-excitation


def test_pretrained_lite_differs_from_random_init_and_keeps_a_fresh_head():
    torch.manual_seed(0)
    pretrained = build_model("efficientnet-lite0", 7, 64, pretrained=True)
    random = build_model("efficientnet-lite0", 7, 64, pretrained=False)
    stem = "backbone.net._conv_stem.weight"
    assert not torch.equal(pretrained.state_dict()[stem], random.state_dict()[stem])
    assert pretrained.head.out_features == 7


def test_b0_warm_start_copies_every_lite0_tensor_and_starts_se_as_a_constant_gate():
    b0 = build_model("efficientnet-b0", 7, 64, pretrained=True)
    lite = build_model("efficientnet-lite0", 7, 64, pretrained=True)
    b0_state, lite_state = b0.state_dict(), lite.state_dict()
    shared = [k for k in b0_state if "_se_" not in k and not k.startswith("head.")]
    assert len(shared) == len([k for k in lite_state if not k.startswith("head.")])
    assert all(torch.equal(b0_state[k], lite_state[k]) for k in shared)
    se_expand = [k for k in b0_state if "_se_expand" in k]
    assert se_expand and all(not b0_state[k].any() for k in se_expand if k.endswith("weight"))
    gates = torch.sigmoid(torch.cat([b0_state[k] for k in se_expand if k.endswith("bias")]))
    assert torch.allclose(gates, torch.full_like(gates, 0.95))
    block = b0.backbone.net._blocks[1][0]
    assert block.has_se and not isinstance(block._swish, torch.nn.ReLU6)  # still a B0: SE and swish


def test_pretrained_is_refused_for_efficientnets_without_offline_weights():
    with pytest.raises(ValueError, match="no ImageNet weights for efficientnet-b3"):
        build_model("efficientnet-b3", 7, 64, pretrained=True)


def test_corrupt_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(lite_checkpoint_path("efficientnet-lite0"), bad)
    with open(bad, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00" * 16)
    with pytest.raises(ValueError, match="corrupt"):
        verify_sha256_prefix(bad)


def test_bundle_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet-b0", 3, 64).eval()
    card = {
        "architecture": {"name": "efficientnet-b0", "kwargs": {}},
        "class_names": ["a", "b", "c"],
        "malignant_classes": ["c"],
        "input_size": 64,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "operating_threshold": 0.3,
    }
    save_bundle(tmp_path / "b", model, card)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["card.json", "weights.safetensors"]
    bundle = load_bundle(tmp_path / "b")
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), bundle.model(x))
    assert bundle.operating_threshold == 0.3 and bundle.class_names == ["a", "b", "c"]
    assert "torch" in json.loads((tmp_path / "b" / "card.json").read_text())["versions"]


def test_bundle_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no card.json"):
        load_bundle(tmp_path)
    with pytest.raises(ValueError, match="class_names"):
        save_bundle(tmp_path / "x", torch.nn.Linear(2, 2), {"architecture": {}, "input_size": 1, "normalization": {}})


def test_pretrained_request_for_a_net_without_weights_is_logged(caplog):
    with caplog.at_level("WARNING", logger="models.registry"):
        build_model("small-cnn", 3, 32, pretrained=True, widths=(8,))
    assert "small-cnn has no pretrained weights" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="models.registry"):
        build_model("small-cnn", 3, 32, pretrained=False, widths=(8,))
    assert caplog.text == ""
