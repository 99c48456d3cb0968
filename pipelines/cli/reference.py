"""The CLI and config reference (docs/reference.md), generated from the parser and the config models so that
every default is written once, in the code. `python -m pipelines.cli.reference [PATH]` rewrites the file."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = ["REFERENCE_PATH", "render_reference"]

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
HEADER = ("# CLI and config reference\n\nGenerated from the code by `python -m pipelines.cli.reference`; do not edit "
          "by hand (a test checks it is current).\n")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(value: Any) -> str:
    return "—" if value is None else f"`{value}`"


def _portable(value: Any) -> Any:
    """A default that names a file of the source tree, relative to it (the same page on every checkout)."""
    root = str(REFERENCE_PATH.parents[1]) + "/"
    return value.replace(root, "") if isinstance(value, str) else value


def _command_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        default = "required" if action.required else (
            "—" if action.default in (None, argparse.SUPPRESS, False) else f"`{_portable(action.default)}`")
        text = (action.help or "").replace("%%", "%")
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| `{name}` | {default} | {_cell(text)} |")
    return rows


def _commands() -> list[str]:
    from pipelines.cli import build_parser

    lines = ["## Commands", ""]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name, parser in sub.choices.items():
        lines += [f"### `lesionlab {name}`", "", _cell(helps.get(name, "")), ""]
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for child_name, child in nested[0].choices.items():
                lines += [f"#### `lesionlab {name} {child_name}`", "", *_command_rows(child), ""]
        else:
            lines += [*_command_rows(parser), ""]
    return lines


def _model_rows(model: type[BaseModel], prefix: str, list_sections: bool = True
                ) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """The field table of a config model, and its nested sections as (dotted path, model); `list_sections` False
    leaves the nested sections out of the table."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner = [annotation]
        if inner:
            nested.append((f"{prefix}.{name}" if prefix else name, inner[0]))
            if not list_sections:
                continue
        default = field.get_default(call_default_factory=True)
        shown = "(section)" if isinstance(default, BaseModel) else _default(default)
        rows.append(f"| `{name}` | `{_cell(_type_name(annotation))}` | {shown} | {_cell(field.description or '')} |")
    return rows, nested


def _config() -> list[str]:
    from pipelines.config import RunConfig

    lines = ["## Config sections", "", "A run config is one YAML file (`lesionlab run --config FILE`); any field can "
             "be overridden on the command line as `section.field=value`. Unknown keys and bad values stop the run "
             "when the config is loaded, before any stage runs. An optional section that is absent does not run.", ""]
    top, queue = _model_rows(RunConfig, "", list_sections=False)
    optional = [path for path, _ in queue if RunConfig.model_fields[path].default is None]
    lines += ["### top level", "", *top, "",
              "Optional sections (absent: the stage does not run): " + ", ".join(f"`{n}`" for n in optional) + ".", ""]
    while queue:  # depth first, so a nested section follows its parent
        path, model = queue.pop(0)
        rows, nested = _model_rows(model, path)
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        lines += [f"### `{path}:`", "", _cell(doc), "", *rows, ""]
        queue = nested + queue
    return lines


def render_reference() -> str:
    """The whole reference as Markdown."""
    return "\n".join([HEADER, *_commands(), *_config()]).rstrip() + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE_PATH
    target.write_text(render_reference())
    print(f"wrote {target}")
