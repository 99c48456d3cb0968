"""What every command group shares: the one-line user error, config arguments, and flags made from config models.

A stage's flags are generated from its pydantic config model (`add_model_arguments`), so a field's name, type,
default, range and help are written once, in `pipelines.config`; `settings_from_args` turns the flags a user gave
back into that model, validated, with a one-line error naming the field.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = [
    "CliError",
    "add_config_arguments",
    "add_model_arguments",
    "default_bundle_path",
    "load_run_config",
    "process_rank",
    "settings_from_args",
    "setup_logging",
]

log = logging.getLogger("lesionlab")


def default_bundle_path() -> Path:
    """The bundle shipped with lesionlab (models/default_bundle in the source tree or the install), found without
    importing `models` (torch, MONAI): every `lesionlab` call builds the parser, and a typo must fail fast."""
    spec = importlib.util.find_spec("models")
    return Path(next(iter(spec.submodule_search_locations))) / "default_bundle"


class CliError(Exception):
    """A user error the CLI reports as one line (exit code 2)."""


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """What every config-driven command takes: --config, --run-dir and `section.field=value` overrides."""
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    parser.add_argument("overrides", nargs="*", help=f"section.field=value, e.g. {example}")


def load_run_config(args: argparse.Namespace):
    """The validated config (with overrides) of a command from `add_config_arguments`, and its run directory."""
    from pipelines.config import load_config

    config = load_config(args.config, args.overrides)
    return config, Path(args.run_dir or config.run_dir)


# ------------------------------------------------------------------------------------ flags from config models


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X (other annotations unchanged)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _key_value(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"'{item}' is not of the form NAME=VALUE")
    return name, value


def _default_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    skip: Iterable[str] = (),
    flags: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One `--field-name` flag per field of `model` (bools get --x/--no-x, lists take several values, a
    `dict[str, V]` field takes NAME=VALUE items, a Literal its choices), unset by default so the model's own
    default applies; `flags` renames a flag (field -> flag name without dashes); `defaults` are the values the
    command starts from instead of the model's (pass the same mapping to `settings_from_args`). Nested models are
    skipped."""
    flags = flags or {}
    defaults = defaults or {}
    metavars = metavars or {}
    # the renamed flags, kept on the parser so that `settings_from_args` can name them in an error
    renamed = dict(parser.get_default("_renamed_flags") or {})
    renamed.update({name: "--" + flag.replace("_", "-") for name, flag in flags.items()})
    parser.set_defaults(_renamed_flags=renamed)
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        default = defaults[name] if name in defaults else field.get_default(call_default_factory=True)
        text = field.description or name.replace("_", " ")
        if "default" not in text:
            text = f"{text} (default: {_default_text(default)})"
        options: dict[str, Any] = {"dest": name, "default": None, "help": text.replace("%", "%%")}
        if name in metavars:
            options["metavar"] = metavars[name]
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            choices = list(typing.get_args(annotation))
            options.update(choices=choices, type=type(choices[0]))
        elif origin in (list, tuple):
            element = _unwrap_optional((typing.get_args(annotation) or (str,))[0])
            options.update(nargs="+", type=element if element in (int, float, str) else str)
        elif origin is dict:
            options.update(nargs="+", type=_key_value, metavar=metavars.get(name, "NAME=VALUE"))
        elif annotation in (int, float, str):
            options["type"] = annotation
        else:
            continue
        parser.add_argument("--" + flags.get(name, name).replace("_", "-"), **options)


def settings_from_args(model: type[BaseModel], args: argparse.Namespace, section: str,
                       base: Mapping[str, Any] | None = None) -> Any:
    """`model` from the flags `add_model_arguments` made (the ones given) over `base`; a bad value is a CliError
    naming the flag (or `section.field` for a value from `base`) and what it expected."""
    from pydantic import ValidationError

    values = dict(base or {})
    given = set()
    for name, field in model.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if typing.get_origin(_unwrap_optional(field.annotation)) is dict:
            value = dict(value)
        values[name] = value
        given.add(name)
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if loc and loc[0] in given:
            flag = (getattr(args, "_renamed_flags", None) or {}).get(loc[0], "--" + loc[0].replace("_", "-"))
            where = " ".join([flag, *loc[1:]])
        else:
            where = ".".join([section, *loc])
        raise CliError(f"{where}: {first['msg']}") from err


# ------------------------------------------------------------------------------------------------------ logging

# Where a multi-process launcher (`accelerate launch`, torchrun, mpirun) puts each process's global rank.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def process_rank() -> int:
    """This process's global rank in a multi-process launch (0 when launched alone)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def setup_logging(verbose: bool = False, rank: int | None = None) -> None:
    """Log to stderr at INFO (DEBUG with -v) on the main process and at WARNING on every other process of a
    multi-process run, so that each progress line appears once; `rank` defaults to the launcher's."""
    rank = process_rank() if rank is None else rank
    level = logging.WARNING if rank > 0 else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a handler was already installed
    for noisy in ("accelerate", "httpx", "PIL"):  # per-checkpoint and per-request chatter
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose and rank == 0 else logging.WARNING)
