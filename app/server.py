"""Starting the web app: `serve` (what `lesionlab serve` runs) and `launch` (the HTTP server with /healthz and
/metrics, logins and the header timeout).

The page itself is `app.layout`, what a request computes `app.service`, the temporary files `app.janitor`; the
`serve` flags are wired in `app.cli`.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from app.auth import LoginChecker
from app.janitor import GRADIO_PREFIX, remove_leftovers, scratch_dir
from app.ops import HeaderTimeout, add_metrics_route, read_token
from app.service import health
from app.settings import ServeSettings

__all__ = ["launch", "serve"]

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def launch(demo: Any, host: str, port: int, settings: ServeSettings, block: bool = True) -> Any:
    """Start the server (no share link, no SSR, API open to gradio_client) with GET /healthz and GET /metrics, close
    connections whose request headers are late, and return the Blocks (built by `app.layout.build_app`)."""
    auth = LoginChecker(settings.auth_file) if settings.auth_file else None
    metrics_token = read_token(settings.metrics_token_file) if settings.metrics_token_file else None
    if auth is None and host not in LOCAL_HOSTS:
        log.warning("serving on %s without a login: anyone who can reach this address can use the app and its API; "
                    "set --auth-file (or LESIONLAB_AUTH_FILE) on a shared network", host)
    demo.launch(
        auth=auth,
        auth_message="lesionlab: sign in with the account your administrator gave you." if auth else None,
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        ssr_mode=False,
        css=getattr(demo, "lesionlab_css", None),
        max_file_size=int(2 * settings.max_file_mb * 2**20),  # our decoder names anything between the two limits
        prevent_thread_lock=True,
        quiet=True,
    )
    service = demo.lesionlab_service
    demo.app.add_api_route("/healthz", lambda: JSONResponse(health(service), headers={"Cache-Control": "no-store"}),
                           methods=["GET"], include_in_schema=False)
    ops = demo.lesionlab_ops
    add_metrics_route(demo.app, ops, metrics_token, login_required=auth is not None)
    if settings.header_timeout_s:
        HeaderTimeout(demo.server, settings.header_timeout_s, on_close=ops.header_timeouts.inc).start()
    if block:
        demo.block_thread()
    return demo


def _private_gradio_dir() -> None:
    """Give Gradio's upload cache a private folder (0700) removed at exit, unless GRADIO_TEMP_DIR is set."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return
    os.environ["GRADIO_TEMP_DIR"] = str(scratch_dir(GRADIO_PREFIX))


def _exit_on_sigterm() -> None:
    """`docker stop` and service managers send SIGTERM: exit as on Ctrl-C, so the exit clean-up runs."""

    def _stop(signum: int, _frame: Any) -> None:
        log.info("stopping (signal %d); removing uploads and outputs", signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)


def serve(models_dir: str | Path, host: str, port: int, settings: ServeSettings) -> None:
    """Load every bundle in `models_dir` once and serve the app on `host:port` until stopped (Ctrl-C or SIGTERM);
    the scratch folders of a server that was killed are removed first, this server's own when it stops."""
    removed = remove_leftovers()
    if removed:
        log.info("removed %d scratch folder(s) left by a server that did not stop cleanly", removed)
    _exit_on_sigterm()
    _private_gradio_dir()
    # Imported only now: Gradio reads GRADIO_TEMP_DIR when it is first imported, so the private folder comes first.
    from app.layout import build_app

    demo = build_app(models_dir, settings)
    log.info("serving on http://%s:%d (concurrency %d)", host, port, settings.concurrency)
    launch(demo, host, port, settings, block=True)
