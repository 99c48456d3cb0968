"""Beta-Rank scores, structural pruning of EfficientNet / the plain CNN, channel plans and pruned bundles."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, load_bundle, save_bundle
from models.pruned import apply_channel_plan, extract_channel_plan
from pipelines import pruning

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "ham10000_sample"


def reference_beta_rank(conv: nn.Conv2d, images: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Beta-Rank by explicit loops over filters and output positions (independent of the vectorised code)."""
    w = conv.weight.detach().double().numpy()
    with torch.no_grad():
        out = conv(torch.from_numpy(images).float()).double().numpy()
    (ph, pw), (sh, sw), (kh, kw) = conv.padding, conv.stride, conv.kernel_size
    x = np.pad(images, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    per_group = conv.in_channels // conv.groups
    filters_per_group = conv.out_channels // conv.groups
    scores = []
    for k in range(conv.out_channels):
        g = k // filters_per_group
        ratios = []
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                sigma_out = out[:, k, i, j].std()
                patch = x[:, g * per_group:(g + 1) * per_group, i * sh:i * sh + kh, j * sw:j * sw + kw]
                sigma_in = patch.std()
                num, den = (sigma_out, sigma_in) if inverse else (sigma_in, sigma_out)
                if den > 0:
                    ratios.append(num / den)
        beta = np.mean(ratios) if ratios else 0.0
        scores.append(np.abs(w[k]).sum() * beta)
    scores = np.array(scores)
    return scores / scores.max()


def hand_set_conv(**kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(bias=False, **kwargs)
    n = conv.weight.numel()
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-1.0, 1.5, n).reshape(conv.weight.shape) ** 3)
    return conv


def hand_set_images(n: int, c: int, h: int, w: int) -> np.ndarray:
    grid = np.arange(n * c * h * w, dtype=np.float64).reshape(n, c, h, w)
    return np.sin(grid * 0.7) + 0.1 * (grid % 5)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(in_channels=2, out_channels=3, kernel_size=2),
        dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), groups=2),
    ],
)
@pytest.mark.parametrize("inverse", [False, True])
def test_beta_rank_equals_hand_computation(conv_kwargs, inverse):
    conv = hand_set_conv(**conv_kwargs)
    model = nn.Sequential(conv)
    images = hand_set_images(5, conv.in_channels, 5, 6)
    expected = reference_beta_rank(conv, images, inverse)
    # two batches (3 + 2 images): statistics must cover both, not only the last
    batches = [torch.from_numpy(images[:3]).float(), torch.from_numpy(images[3:]).float()]
    got = pruning.normalize_per_layer(pruning.beta_rank_scores(model, batches, inverse=inverse))["0"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_beta_rank_uses_every_calibration_batch():
    conv = hand_set_conv(in_channels=2, out_channels=3, kernel_size=2)
    images = torch.from_numpy(hand_set_images(6, 2, 4, 4)).float()
    whole = pruning.beta_rank_scores(nn.Sequential(conv), [images])["0"]
    split = pruning.beta_rank_scores(nn.Sequential(conv), [images[:2], images[2:4], images[4:]])["0"]
    last_only = pruning.beta_rank_scores(nn.Sequential(conv), [images[4:]])["0"]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(last_only, whole, rtol=1e-3)


def test_both_beta_variants_rank_a_dead_filter_last():
    conv = hand_set_conv(in_channels=2, out_channels=3, kernel_size=2)
    with torch.no_grad():
        conv.weight[1].zero_()  # constant (zero) response: no spread, no information
    images = [torch.from_numpy(hand_set_images(4, 2, 4, 4)).float()]
    for inverse in (False, True):
        scores = pruning.beta_rank_scores(nn.Sequential(conv), images, inverse=inverse)["0"]
        assert scores[1] == 0 and scores.argmin() == 1


def test_importance_needs_calibration_images():
    with pytest.raises(ValueError, match="needs calibration images"):
        pruning.BetaRankImportance().calibrate(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="needs calibration images"):
        pruning.build_importance("hrank").calibrate(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="unknown pruning method 'taylor'"):
        pruning.build_importance("taylor")


def test_every_method_is_a_torch_pruning_importance_of_its_own_class():
    import torch_pruning as tp

    built = {method: pruning.build_importance(method, seed=3) for method in pruning.METHODS}
    assert all(isinstance(importance, tp.importance.Importance) for importance in built.values())
    assert {method: type(importance).__name__ for method, importance in built.items()} == {
        "beta-rank": "BetaRankImportance", "beta-rank-inverse": "BetaRankImportance", "l1": "L1Importance",
        "hrank": "HRankImportance", "random": "SeededRandomImportance"}
    assert (built["beta-rank"].inverse, built["beta-rank-inverse"].inverse) == (False, True)
    assert {method for method, importance in built.items() if importance.needs_data} == set(pruning.DATA_METHODS)


def test_l1_importance_is_torch_prunings_filter_l1_norm_normalised_per_layer():
    import torch_pruning as tp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1, groups=2))
    scores = pruning.L1Importance().calibrate(model).scores
    for name, conv in pruning.conv_layers(model).items():
        by_hand = conv.weight.detach().abs().flatten(1).sum(1)
        torch.testing.assert_close(scores[name], by_hand / by_hand.max())
        magnitude = tp.importance.MagnitudeImportance(p=1, normalizer="max")(pruning.filter_group(conv, name))
        torch.testing.assert_close(scores[name], magnitude)
    assert scores["0"].argmax() == pruning.conv_layers(model)["0"].weight.abs().flatten(1).sum(1).argmax()


def test_random_importance_is_seeded_and_leaves_the_global_random_state_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 1))
    state = torch.get_rng_state()
    first = pruning.SeededRandomImportance(seed=1).calibrate(model).scores
    assert torch.equal(torch.get_rng_state(), state)
    again = pruning.SeededRandomImportance(seed=1).calibrate(model).scores
    other = pruning.SeededRandomImportance(seed=2).calibrate(model).scores
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["0"], other["0"])
    assert {name: s.numel() for name, s in first.items()} == {"0": 8, "1": 5}


def test_a_group_scores_the_mean_of_its_coupled_convolutions_normalised_scores():
    import torch_pruning as tp
    from torch_pruning.pruner import function

    class TwoBranches(nn.Module):  # the sum couples the output channels of both convolutions
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head((self.a(x) + self.b(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = TwoBranches()
    importance = pruning.L1Importance().calibrate(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.a, function.prune_conv_out_channels, idxs=list(range(4)))
    expected = (importance.scores["a"] + importance.scores["b"]) / 2
    torch.testing.assert_close(importance(group), expected)
    assert not torch.allclose(expected, importance.scores["a"])


def _min_channels(model, fraction=0.9):
    import math

    return {n: max(1, math.ceil((1 - fraction) * c.out_channels)) for n, c in pruning.conv_layers(model).items()}


@pytest.fixture(scope="module")
def pruned_b0():
    torch.manual_seed(0)
    model = build_model("efficientnet-b0", num_classes=7, img_size=32).eval()
    original = {n: c.out_channels for n, c in pruning.conv_layers(model).items()}
    importance = pruning.BetaRankImportance().calibrate(model, [torch.randn(4, 3, 32, 32)])
    pruning.prune_once(model, importance, 0.5, 32, _min_channels(model))
    return model, original


def test_pruned_efficientnet_has_requested_channel_counts(pruned_b0):
    model, original = pruned_b0
    convs = pruning.conv_layers(model)
    for name, conv in convs.items():
        assert conv.out_channels == max(1, int(original[name] * 0.5)), name
        if conv.groups > 1:  # depthwise: input and output channels stay coupled
            assert conv.groups == conv.in_channels == conv.out_channels
    assert model.head.out_features == 7
    assert model.head.in_features == convs["backbone.net._conv_head"].out_channels == model.embed_dim == 640


def test_pruned_efficientnet_runs_and_round_trips_through_a_bundle(pruned_b0, tmp_path):
    model, _ = pruned_b0
    card = {"architecture": {"name": "efficientnet-b0", "kwargs": {}, "channel_plan": extract_channel_plan(model)},
            "class_names": list("abcdefg"), "input_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_bundle(tmp_path / "bundle", model, card)
    json.loads((tmp_path / "bundle" / "card.json").read_text())  # the plan is plain JSON
    loaded = load_bundle(tmp_path / "bundle").model
    assert loaded.embed_dim == model.embed_dim
    with torch.no_grad():
        for size in (32, 48, 64):
            x = torch.randn(2, 3, size, size)
            assert torch.equal(loaded(x), model(x)), size


def test_flops_drop_accordingly(pruned_b0):
    model, _ = pruned_b0
    before = pruning.count_flops(build_model("efficientnet-b0", num_classes=7, img_size=32), 32)
    after = pruning.count_flops(model, 32)
    assert 0.55 < 1 - after / before < 0.85  # halving channels roughly quarters the 1x1-conv cost
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert pruning.count_flops(nn.Sequential(conv), 16) == 2 * 8 * 3 * 9 * 16 * 16


@pytest.mark.parametrize("method", ["beta-rank-inverse", "hrank", "random"])
def test_prune_to_flops_hits_the_target_on_the_plain_cnn(method):
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, img_size=32, widths=(8, 16, 32)).eval()
    base = pruning.count_flops(model, 32)
    stages = []
    result = pruning.prune_to_flops(model, method, 0.5, 32, calibration=[torch.randn(8, 3, 32, 32)], steps=2,
                                    fine_tune=lambda m, s: stages.append(s))
    assert stages == [1, 2]
    assert result.flops == pruning.count_flops(model, 32) < base
    assert 0.5 <= result.flops_reduction < 0.6
    assert result.stages[0]["flops_reduction"] < result.stages[1]["flops_reduction"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("steps", [1, 3])
def test_layer_ratios_fix_those_layers_and_the_search_prunes_the_rest(steps):
    torch.manual_seed(0)
    fixed = {"backbone.features.0": 0.75, "backbone.features.3": 0.75}
    model = build_model("small-cnn", num_classes=3, img_size=32).eval()  # widths 32/64/128/256
    result = pruning.prune_to_flops(model, "l1", 0.55, 32, calibration=[torch.randn(4, 3, 32, 32)], steps=steps,
                                    round_to=8, layer_ratios=fixed)
    widths = {n: c.out_channels for n, c in pruning.conv_layers(model).items()}
    assert widths["backbone.features.0"] == widths["backbone.features.3"] == 8  # 75 % of 32 removed
    assert 0.55 <= result.flops_reduction < 0.62
    # the FLOPs the first stage gave up stay in the deeper layers: wider than a uniform cut to the same target
    uniform = build_model("small-cnn", num_classes=3, img_size=32).eval()
    pruning.prune_to_flops(uniform, "l1", 0.55, 32, calibration=[torch.randn(4, 3, 32, 32)], steps=steps, round_to=8)
    deepest = list(widths)[-1]
    assert widths[deepest] > pruning.conv_layers(uniform)[deepest].out_channels
    with pytest.raises(ValueError, match="'backbone.nope', which is not a convolution"):
        pruning.prune_to_flops(copy.deepcopy(uniform), "l1", 0.3, 32, calibration=[torch.randn(4, 3, 32, 32)],
                               layer_ratios={"backbone.nope": 0.5})
    with pytest.raises(ValueError, match=r"layer_ratios\['backbone.features.0'\] is 1.0"):
        pruning.prune_to_flops(copy.deepcopy(uniform), "l1", 0.3, 32, calibration=[torch.randn(4, 3, 32, 32)],
                               layer_ratios={"backbone.features.0": 1.0})


@pytest.mark.parametrize("global_pruning", [False, True])
def test_pruning_never_removes_every_filter_of_a_layer(global_pruning):
    torch.manual_seed(0)
    model = build_model("efficientnet-lite0", num_classes=2, img_size=32).eval()
    original = {n: c.out_channels for n, c in pruning.conv_layers(model).items()}
    floor = _min_channels(model)
    importance = pruning.SeededRandomImportance().calibrate(model)
    pruning.prune_once(model, importance, 0.99, 32, floor, global_pruning)
    for name, conv in pruning.conv_layers(model).items():
        assert conv.out_channels >= max(1, floor[name]), name
        assert conv.out_channels < original[name] or original[name] == floor[name]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_channel_plan_round_trip_on_lite0_and_errors():
    model = build_model("efficientnet-lite0", num_classes=2, img_size=32).eval()
    pruning.prune_once(model, pruning.L1Importance().calibrate(model), 0.3, 32, _min_channels(model))
    plan = json.loads(json.dumps(extract_channel_plan(model)))
    fresh = apply_channel_plan(build_model("efficientnet-lite0", num_classes=2, img_size=32), plan)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="does not have"):
        apply_channel_plan(build_model("small-cnn", num_classes=2, img_size=32), plan)
    bad = json.loads(json.dumps(plan))
    bad["modules"]["head"]["out_features"] = 5
    with pytest.raises(ValueError, match="classes are fixed"):
        apply_channel_plan(build_model("efficientnet-lite0", num_classes=2, img_size=32), bad)


def test_prune_cli_on_the_sample(tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.manifest import grouped_split, ingest_ham10000, write_manifest

    manifest = grouped_split(ingest_ham10000(SAMPLE), 0.15, 0.15, seed=0)
    write_manifest(manifest, tmp_path / "manifest.csv")
    classes = sorted(manifest.label.unique())
    model = build_model("small-cnn", num_classes=len(classes), img_size=32, widths=(8, 16))
    card = {"architecture": {"name": "small-cnn", "kwargs": {"widths": [8, 16]}}, "class_names": classes,
            "malignant_classes": ["mel", "bcc", "akiec"], "input_size": 32,
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "training": {"class_weighting": "inverse"}}
    save_bundle(tmp_path / "bundle", model, card)
    main(["prune", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "manifest.csv"),
          "--out", str(tmp_path / "pruned"), "--method", "beta-rank", "--flops-reduction", "0.4",
          "--epochs", "1", "--max-steps-per-epoch", "2", "--calibration-per-class", "3", "--speed-runs", "3",
          "--batchnorm-images", "8", "--round-to", "1", "--distill-weight", "1", "--distill-temperature", "3",
          "--distill-class-weighted", "--layer-ratio", "backbone.features.0=0.5", "--fine-tune-ema", "0.9"])
    assert "fewer" in capsys.readouterr().out
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    assert report["after"]["flops"] < 0.62 * report["before"]["flops"]
    assert report["calibration_counts"] == {c: 3 for c in classes}
    assert (report["settings"]["batchnorm_images"], report["settings"]["fine_tune_ema"]) == (8, 0.9)
    assert (report["settings"]["round_to"], report["settings"]["distill_weight"]) == (1, 1.0)
    assert (report["settings"]["distill_temperature"], report["settings"]["distill_class_weighted"]) == (3.0, True)
    assert set(report["after"]["accuracy"]) >= {"balanced_accuracy", "malignant_auc", "minority_recall"}
    pruned = load_bundle(tmp_path / "pruned")
    assert pruned.card["architecture"]["channel_plan"]["modules"]["head"]["in_features"] < 16
    assert report["settings"]["layer_ratios"] == {"backbone.features.0": 0.5}
    assert pruned.card["architecture"]["channel_plan"]["modules"]["backbone.features.0"]["out_channels"] == 4
    assert pruning.count_flops(pruned.model, 32) == report["after"]["flops"]
    code = main(["prune", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "manifest.csv"),
                 "--out", str(tmp_path / "x"), "--flops-reduction", "1.5"])
    assert code == 2 and "--flops-reduction: Input should be less than 1" in capsys.readouterr().err
    code = main(["prune", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "manifest.csv"),
                 "--out", str(tmp_path / "x"), "--round-to", "0"])
    assert code == 2 and "--round-to: Input should be greater than or equal to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as parse_error:  # a malformed item is an argparse error, before any work
        main(["prune", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "manifest.csv"),
              "--out", str(tmp_path / "x"), "--layer-ratio", "backbone.features.0"])
    err = capsys.readouterr().err
    assert parse_error.value.code == 2 and "--layer-ratio: 'backbone.features.0' is not of the form NAME=VALUE" in err
    code = main(["prune", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "manifest.csv"),
                 "--out", str(tmp_path / "x"), "--layer-ratio", "backbone.nope=0.5", "--speed-runs", "2"])
    assert code == 2 and "'backbone.nope', which is not a convolution" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fine_tune_control_scores_the_unpruned_net_before_and_after_each_fine_tune(tmp_path):
    from pipelines.config import PruningConfig
    from pipelines.manifest import grouped_split, ingest_ham10000, write_manifest

    manifest = grouped_split(ingest_ham10000(SAMPLE), 0.15, 0.15, seed=0)
    write_manifest(manifest, tmp_path / "manifest.csv")
    classes = sorted(manifest.label.unique())
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=len(classes), img_size=32, widths=(8, 16))
    card = {"architecture": {"name": "small-cnn", "kwargs": {"widths": [8, 16]}}, "class_names": classes,
            "malignant_classes": ["mel", "bcc", "akiec"], "input_size": 32,
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
            "training": {"class_weighting": "inverse", "sampler": "sqrt"}}
    save_bundle(tmp_path / "bundle", model, card)
    before = {k: v.clone() for k, v in load_bundle(tmp_path / "bundle").model.state_dict().items()}
    settings = PruningConfig(fine_tune_epochs=1, fine_tune_lr=0.01, fine_tune_ema=0.5, max_steps_per_epoch=2,
                             batch_size=8, batchnorm_images=8)
    record = pruning.fine_tune_control(tmp_path / "bundle", tmp_path / "manifest.csv", tmp_path / "control", settings,
                                       stages=2)
    val = (manifest.split == "val").sum()
    assert (record["split"], record["images"], record["views"]) == ("val", val, 1)
    assert [row["stage"] for row in record["stages"]] == [0, 1, 2]
    assert all(0 <= row["balanced_accuracy"] <= 1 for row in record["stages"])
    assert record["settings"]["fine_tune_ema"] == 0.5
    assert (tmp_path / "control" / "finetune" / "stage2").is_dir()
    # the bundle on disk is untouched
    after = load_bundle(tmp_path / "bundle").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="control stages 0"):
        pruning.fine_tune_control(tmp_path / "bundle", tmp_path / "manifest.csv", tmp_path / "c0", settings,
                                  stages=0)


def test_batchnorm_recalibration_matches_the_statistics_of_the_data():
    from pipelines.pruning import recalibrate_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01)).eval()
    batches = [torch.randn(8, 3, 10, 10) * 3 + 1 for _ in range(4)]
    assert recalibrate_batchnorm(net, batches) == 32
    with torch.no_grad():
        conv_out = torch.cat([net[0](b) for b in batches])
    bn = net[1]
    assert torch.allclose(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    # cumulative average of per-batch unbiased variances (PyTorch's momentum=None rule)
    per_batch = torch.stack([net[0](b).var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0).detach()
    assert torch.allclose(bn.running_var, per_batch, atol=1e-3)
    assert not net.training and bn.momentum == 0.01


def test_prune_to_flops_re_estimates_batchnorm_on_the_given_sample_after_the_fine_tune():
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, img_size=16, widths=(8, 16)).eval()
    calibration = [torch.randn(8, 3, 16, 16)]
    sample = [torch.randn(16, 3, 16, 16) * 2 + 3 for _ in range(2)]

    def fine_tune(m, stage):  # stands in for training: moves the weights the first BatchNorm sees
        with torch.no_grad():
            pruning.conv_layers(m)[next(iter(pruning.conv_layers(m)))].weight.mul_(3)

    result = pruning.prune_to_flops(model, "l1", 0.4, 16, calibration=calibration, fine_tune=fine_tune,
                                    batchnorm_batches=sample)
    first_conv = next(iter(pruning.conv_layers(result.model).values()))
    norm = next(m for m in result.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        expected = torch.cat([first_conv(x) for x in sample]).mean(dim=(0, 2, 3))
    assert norm.num_features == first_conv.out_channels
    assert torch.allclose(norm.running_mean, expected, atol=1e-4)


def test_kept_channels_rounds_up_to_the_multiple_and_respects_the_floor():
    assert pruning.kept_channels(32, 13, floor=4) == 13  # no rounding asked
    assert pruning.kept_channels(32, 13, floor=4, round_to=8) == 16  # rounded up, never below what pruning keeps
    assert pruning.kept_channels(32, 16, floor=4, round_to=8) == 16
    assert pruning.kept_channels(32, 2, floor=4, round_to=8) == 8  # the floor first, then the rounding
    assert pruning.kept_channels(8, 5, floor=1, round_to=8) == 8  # a layer of <= round_to filters stays whole
    assert pruning.kept_channels(36, 33, floor=4, round_to=8) == 36  # never more than the layer has


def test_round_to_prunes_efficientnet_b0_to_multiples_of_8_and_still_reaches_the_flops_target():
    torch.manual_seed(0)
    model = build_model("efficientnet-b0", num_classes=7, img_size=32).eval()
    original = {n: c.out_channels for n, c in pruning.conv_layers(model).items()}
    result = pruning.prune_to_flops(model, "l1", 0.5, 32, round_to=8)
    assert 0.5 <= result.flops_reduction < 0.53  # the ratio search compensates for the rounding up
    convs = pruning.conv_layers(result.model)
    changed = [n for n, c in convs.items() if c.out_channels != original[n]]
    assert len(changed) > 30  # most layers were pruned ...
    for name in changed:  # ... and each to a multiple of 8
        assert convs[name].out_channels % 8 == 0, (name, convs[name].out_channels)
    for name, conv in convs.items():
        if original[name] <= 8 and name.endswith("_se_reduce"):
            assert conv.out_channels == original[name], name  # squeeze layers of <= 8 filters stay whole
    assert result.model(torch.randn(2, 3, 48, 48)).shape == (2, 7)


def test_distillation_loss_adds_the_tempered_kl_to_the_task_loss_and_freezes_the_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    ce = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 4.0]))
    forward = pruning.distillation_loss(teacher, ce, weight=0.5, temperature=2.0)
    got = forward(student, (x, y), 0)
    p_t = torch.softmax(teacher(x) / 2, 1)
    log_p_s = torch.log_softmax(student(x) / 2, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    assert torch.allclose(got, ce(student(x), y) + 0.5 * 4 * kl, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    # a student equal to its teacher pays only the task loss; weight 0 is the task loss alone
    twin = copy.deepcopy(teacher).requires_grad_(True)
    assert torch.allclose(forward(twin, (x, y), 0), ce(twin(x), y), atol=1e-6)
    assert torch.allclose(pruning.distillation_loss(teacher, ce, 0.0)(student, (x, y), 0), ce(student(x), y))
    # the gradient of the distillation term pulls the student's outputs towards the teacher's
    only_kd = pruning.distillation_loss(teacher, lambda logits, labels: logits.sum() * 0, weight=1.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    before = only_kd(student, (x, y), 0).item()
    for _ in range(20):
        optimizer.zero_grad()
        only_kd(student, (x, y), 0).backward()
        optimizer.step()
    assert only_kd(student, (x, y), 0).item() < 0.5 * before
    with pytest.raises(ValueError, match="temperature"):
        pruning.distillation_loss(teacher, ce, 1.0, temperature=0)


def test_class_weighted_distillation_is_the_weighted_mean_of_the_per_image_kl():
    torch.manual_seed(1)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 0, 0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 3.0])
    no_task = lambda logits, labels: logits.sum() * 0  # noqa: E731
    got = pruning.distillation_loss(teacher, no_task, 1.0, temperature=1.0, class_weights=weights)(student, (x, y), 0)
    p_t = torch.softmax(teacher(x), 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student(x), 1))).sum(1)
    # by hand: (0.5 (kl0 + kl1 + kl2) + 2 kl3 + 3 kl4) / (3 * 0.5 + 2 + 3)
    expected = (0.5 * kl[:3].sum() + 2.0 * kl[3] + 3.0 * kl[4]) / 6.5
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, kl.mean(), atol=1e-4)  # the plain batch mean differs on this batch
    # equal weights are the plain batch mean
    equal = pruning.distillation_loss(teacher, no_task, 1.0, temperature=1.0, class_weights=torch.ones(3))
    assert torch.allclose(equal(student, (x, y), 0), kl.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="2 class weights for a model with 3 outputs"):
        pruning.distillation_loss(teacher, no_task, 1.0, class_weights=torch.ones(2))(student, (x, y), 0)
    with pytest.raises(ValueError, match="one positive weight per class"):
        pruning.distillation_loss(teacher, no_task, 1.0, class_weights=torch.tensor([1.0, 0.0, 1.0]))


def test_serving_latency_times_three_conditions_and_rejects_a_frozen_model_that_differs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 2)).eval()
    timed = pruning.serving_latency(net, runs=3)
    assert list(timed) == list(pruning.SERVING_CONDITIONS) == ["fresh", "warm", "frozen"]
    assert all(v > 0 for v in timed.values())

    class Drifting(nn.Module):  # what tracing records (a constant) is not what eager mode computes
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x.mean(dim=(2, 3)) * self.calls

    with pytest.raises(RuntimeError, match="frozen model's outputs differ"):
        pruning.serving_latency(Drifting().eval(), runs=1, input_size=32)


def test_calibration_rows_are_class_balanced_real_first_and_batchnorm_rows_a_seeded_sample():
    import pandas as pd

    labels = ["nv"] * 30 + ["mel"] * 6 + ["df"] * 2
    sources = ["real"] * 30 + ["synthetic"] * 3 + ["real"] * 3 + ["real"] * 2
    train = pd.DataFrame({"label": labels, "source": sources})
    rows = pruning.balanced_calibration_rows(train, per_class=4, seed=0)
    assert rows.label.value_counts().to_dict() == {"nv": 4, "mel": 4, "df": 2}
    assert (rows[rows.label == "mel"].source == "real").sum() == 3  # every real one before any synthetic
    assert rows.index.is_unique and set(rows.index) <= set(train.index)
    assert rows.index.equals(pruning.balanced_calibration_rows(train, per_class=4, seed=0).index)
    # a table without `source` (an in-memory image array's labels) works too
    plain = pruning.balanced_calibration_rows(train[["label"]], per_class=1, seed=0)
    assert plain.label.value_counts().to_dict() == {"nv": 1, "mel": 1, "df": 1}
    with pytest.raises(ValueError, match="no training rows"):
        pruning.balanced_calibration_rows(train.iloc[:0], per_class=4)
    sample = pruning.batchnorm_rows(train, 10, seed=1)
    assert len(sample) == 10 and sample.index.equals(pruning.batchnorm_rows(train, 10, seed=1).index)
    assert not sample.index.equals(pruning.batchnorm_rows(train, 10, seed=2).index)
    assert len(pruning.batchnorm_rows(train, 1000)) == len(train)


def test_stage_fine_tuner_trains_each_stage_in_its_own_folder_with_the_pruning_settings(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.config import PruningConfig

    settings = PruningConfig(fine_tune_epochs=2, fine_tune_lr=0.05, batch_size=4, max_steps_per_epoch=3, seed=5)
    train_settings = pruning.fine_tune_settings(settings, "inverse")
    assert (train_settings.epochs, train_settings.lr, train_settings.batch_size) == (2, 0.05, 4)
    assert (train_settings.max_steps_per_epoch, train_settings.seed, train_settings.warmup_epochs) == (3, 5, 0)
    assert (train_settings.class_weighting, train_settings.ema_decay, train_settings.resume) == ("inverse", 0, False)
    assert pruning.fine_tune_settings(settings, "none", epochs=6).epochs == 6
    ema = settings.model_copy(update={"fine_tune_ema": 0.99})
    assert pruning.fine_tune_settings(ema, "none").ema_decay == 0.99

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 4, 4), torch.arange(16) % 2
    data = TensorDataset(x, y)
    loaders = []

    def train_loader(stage):
        loaders.append(stage)
        return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(stage))

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    before = copy.deepcopy(model.state_dict())
    tune = pruning.stage_fine_tuner(train_loader, DataLoader(data, batch_size=8), nn.CrossEntropyLoss(),
                                    train_settings, tmp_path / "ft")
    tuned = tune(model, 2)
    assert loaders == [2] and (tmp_path / "ft" / "stage2").is_dir() and not (tmp_path / "ft" / "stage1").exists()
    assert not torch.equal(tuned.state_dict()["1.weight"], before["1.weight"])
    idle = pruning.stage_fine_tuner(train_loader, None, nn.CrossEntropyLoss(),
                                    pruning.fine_tune_settings(settings, "none", epochs=0), tmp_path / "idle")
    assert idle(model, 1) is model and loaders == [2]
    # distillation only when both it and fine-tuning are on
    assert pruning.distillation_for(model, nn.CrossEntropyLoss(), settings, [8, 8], "inverse") is not None
    off = settings.model_copy(update={"distill_weight": 0.0})
    assert pruning.distillation_for(model, nn.CrossEntropyLoss(), off, [8, 8], "inverse") is None


class _Labelled(torch.utils.data.Dataset):
    """Images that are their own index, with a `labels` list (as ImageDataset has)."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return torch.tensor(index), self.labels[index]


@pytest.mark.parametrize("sampler", ["none", "sqrt", "balanced"])
def test_stage_loaders_draw_with_the_bundles_class_sampler_seeded_per_stage(sampler):
    from pipelines.config import PruningConfig

    labels = [0] * 900 + [1] * 100  # 9:1
    settings = PruningConfig(batch_size=50, seed=3)
    loader = pruning.stage_train_loaders(_Labelled(labels), 2, sampler, settings)

    def drawn(stage):
        return torch.cat([index for index, _ in loader(stage)])

    first = drawn(1)
    assert len(first) == 1000 and torch.equal(first, drawn(1)) and not torch.equal(first, drawn(2))
    share = (first >= 900).float().mean().item()  # the minority class's share of the draws
    expected = {"none": 0.1, "sqrt": 10 / (30 + 10), "balanced": 0.5}[sampler]
    assert share == pytest.approx(expected, abs=0.05)
    if sampler == "none":  # plain shuffling: every image once
        assert sorted(first.tolist()) == list(range(1000))
