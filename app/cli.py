"""The web app's commands, `lesionlab serve` and `lesionlab users add`: argparse wiring and the two functions they
run. The main CLI (`pipelines.cli`) registers them by module name through `add_cli`.

Kept light to import (every `lesionlab` call builds the whole parser): the server, with torch and Gradio, is only
imported when `serve` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from app.auth import AuthFileError, add_user
from app.settings import ServeSettings
from pipelines.cli import default_bundle_path

__all__ = ["add_cli", "serve_cli", "settings_from_args", "users_cli"]

TTA_HELP = ("test-time-augmentation views (default: the bundle's own setting, which its calibration and threshold "
            "were fitted with)")
ENGINE_HELP = ("network runtime: auto uses the bundle's exported ONNX file when it has one (see `lesionlab export`), "
               "else eager PyTorch")


def settings_from_args(args: Any) -> ServeSettings:
    """The ServeSettings that `lesionlab serve` flags describe (checked)."""
    header_timeout = getattr(args, "header_timeout", 15.0)
    settings = ServeSettings(
        concurrency=int(getattr(args, "concurrency", 2)),
        max_file_mb=float(getattr(args, "max_file_mb", 25.0)),
        max_megapixels=float(getattr(args, "max_megapixels", 50.0)),
        tta=getattr(args, "tta", None),
        engine=getattr(args, "engine", "auto"),
        auth_file=getattr(args, "auth_file", None),
        audit_log=getattr(args, "audit_log", None) or None,
        metrics_token_file=getattr(args, "metrics_token_file", None) or None,
        header_timeout_s=float(header_timeout) if header_timeout else None,
    )
    if settings.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {settings.concurrency}")
    if settings.header_timeout_s is not None and settings.header_timeout_s < 0:
        raise ValueError(f"--header-timeout must be positive seconds (0 turns it off), got {header_timeout}")
    return settings


def serve_cli(args: Any) -> None:
    """`lesionlab serve`: load the bundles once and serve the app until interrupted."""
    settings = settings_from_args(args)
    from app.server import serve  # torch, the models and (once the scratch folders are set) Gradio: only now

    serve(args.models, args.host, int(args.port), settings)


def users_cli(args: Any) -> None:
    """`lesionlab users add --auth-file FILE NAME --password-stdin`."""
    if not args.password_stdin:
        raise AuthFileError("give the password on standard input with --password-stdin (it is never an argument)")
    password = sys.stdin.readline().rstrip("\r\n")
    add_user(args.auth_file, args.name, password)
    print(f"user '{args.name}' written to {args.auth_file}")


def add_cli(subparsers: Any) -> None:
    """Register `lesionlab serve` and `lesionlab users`."""
    _add_serve(subparsers)
    _add_users(subparsers)


def _add_serve(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("serve", help="launch the Gradio web app")
    p.add_argument("--models", default=str(default_bundle_path().parent), help="folder of model bundles")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=2, help="requests processed at once")
    p.add_argument("--max-file-mb", type=float, default=25.0)
    p.add_argument("--max-megapixels", type=float, default=50.0)
    p.add_argument("--tta", type=int, choices=[1, 8], help=TTA_HELP)
    p.add_argument("--engine", choices=["auto", "eager", "onnx", "int8"], default="auto", help=ENGINE_HELP)
    p.add_argument("--auth-file", default=os.environ.get("LESIONLAB_AUTH_FILE"),
                   help="login file (lines 'username:<scrypt hash>', see `lesionlab users add`; default "
                   "$LESIONLAB_AUTH_FILE): every page, upload and API call then needs a login")
    p.add_argument("--audit-log", default=os.environ.get("LESIONLAB_AUDIT_LOG"),
                   help="append one JSON line per analysis (time, user, model, referral, latency; never file names "
                   "or images) to this file (default $LESIONLAB_AUDIT_LOG; none when unset)")
    p.add_argument("--metrics-token-file", default=os.environ.get("LESIONLAB_METRICS_TOKEN_FILE"),
                   help="file holding a bearer token that GET /metrics then requires (default "
                   "$LESIONLAB_METRICS_TOKEN_FILE); with --auth-file and no token, /metrics is refused")
    p.add_argument("--header-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection whose request headers are not complete this long after it opened or "
                   "after its last response (default 15; 0 turns it off)")
    p.set_defaults(func=serve_cli)


def _add_users(subparsers: Any) -> None:
    p = subparsers.add_parser("users", help="manage the web app's login file")
    users = p.add_subparsers(dest="users_command", required=True)
    p = users.add_parser("add", help="add a user (or set a new password) in a login file")
    p.add_argument("--auth-file", required=True, help="login file to create or update (mode 0600)")
    p.add_argument("name", help="username: letters, digits, . _ @ -")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=users_cli)
