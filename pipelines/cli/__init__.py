"""The `lesionlab` command line: argparse wiring only, one module per command group; the work is done by library
functions. Every user error ends here as one line on stderr and exit code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

import pipelines  # noqa: F401 - sets the offline/private environment defaults
from pipelines.cli.common import CliError, default_bundle_path, setup_logging

__all__ = ["COMMAND_GROUPS", "build_parser", "default_bundle_path", "main", "setup_logging"]

# Each module registers its sub-commands through `add_cli(subparsers)`, in this order. `app.cli` (serve, users) is
# named, not imported: the web app sits above the pipelines and may import them, never the other way round.
COMMAND_GROUPS: list[str] = [
    "pipelines.cli.data", "pipelines.cli.runs", "pipelines.cli.inference", "pipelines.cli.synthesis",
    "pipelines.cli.balancing", "pipelines.cli.pruning", "pipelines.cli.mil", "app.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="lesionlab", description="Imbalance-aware medical image classification.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lesionlab` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipelines.config import ConfigError
    from pipelines.images import ImageError
    from pipelines.manifest import ManifestError

    try:
        args.func(args)
    except (CliError, ConfigError, ManifestError, ImageError, FileNotFoundError, ValueError, KeyError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lesionlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
