"""Configuration is declared once: typed sections that refuse typos when the config is loaded, CLI flags generated
from the same models, and a reference page generated from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.cli.reference import REFERENCE_PATH, render_reference
from pipelines.config import ConfigError, PruningConfig, load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize("override, named", [
    ("pruning.methd=l1", "pruning.methd"),
    ("pruning.method=l2", "pruning.method"),
    ("balancing.space=voxel", "balancing.space"),
    ("synthesis.min_ratio=high", "synthesis.min_ratio"),
    ("mil.tiling.patch_sise=64", "mil.tiling.patch_sise"),
    ("training.epoch=3", "training.epoch"),
])
def test_a_typo_in_any_section_fails_when_the_config_is_loaded(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_a_config_typo_stops_run_before_any_stage_writes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(DEMO), "--run-dir", str(run_dir), "pruning.methd=l1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pruning.methd" in err[0] and "Extra inputs" in err[0]
    assert not run_dir.exists()


def test_stage_flags_are_the_config_fields_with_their_defaults(tmp_path, capsys):
    from pipelines.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    prune = sub.choices["prune"]
    flags = {option for action in prune._actions for option in action.option_strings}
    # every PruningConfig field has a flag (the renamed ones keep their historical names)
    renamed = {"global_pruning": "--global", "layer_ratios": "--layer-ratio", "fine_tune_epochs": "--epochs",
               "fine_tune_lr": "--lr"}
    for name in PruningConfig.model_fields:
        assert renamed.get(name, "--" + name.replace("_", "-")) in flags
    round_to = next(a for a in prune._actions if "--round-to" in a.option_strings)
    assert f"(default: {PruningConfig().round_to})" in round_to.help


@pytest.mark.parametrize("flags, named", [
    (["--flops-reduction", "2"], "--flops-reduction: Input should be less than 1"),
    (["--layer-ratio", "backbone.features.0=lots"], "--layer-ratio backbone.features.0: Input should be a valid"),
])
def test_a_bad_flag_value_is_one_line_naming_the_field(tmp_path, capsys, flags, named):
    code = main(["prune", "--bundle", str(tmp_path), "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                 *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0]
    assert not (tmp_path / "o").exists()


def test_the_reference_page_is_current():
    assert REFERENCE_PATH.read_text() == render_reference(), (
        "docs/reference.md is stale: run `python -m pipelines.cli.reference`")


def test_the_reference_lists_every_command_and_section():
    text = render_reference()
    for command in ("ingest", "run", "train", "predict", "export", "prune", "balance", "synthesize", "serve"):
        assert f"### `lesionlab {command}`" in text
    for section in ("data", "training", "pruning", "balancing", "mil", "mil.tiling"):
        assert f"### `{section}:`" in text


def test_python_m_pipelines_cli_is_the_lesionlab_command():
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "prune", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--flops-reduction" in done.stdout
