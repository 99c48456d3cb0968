"""Operations for the web app: Prometheus metrics, the audit log, the /metrics route and the header timeout.

Nothing recorded here names a file, holds pixels or per-image probabilities, or says anything about a patient:
metrics are counts and latencies per endpoint and model; an audit line says who asked which model for what kind
of analysis, how many images it covered, the referral outcome, how long it took and whether it failed.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from app.wording import BELOW, REFER

__all__ = [
    "LATENCY_BUCKETS",
    "MIN_TOKEN_CHARS",
    "UNKNOWN_MODEL",
    "AuditLog",
    "Call",
    "HeaderTimeout",
    "Ops",
    "add_metrics_route",
    "read_token",
    "referral_counts",
    "with_request",
]

log = logging.getLogger(__name__)

# Seconds; single images take ~0.3-4 s under load, batches and slides up to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNKNOWN_MODEL = "unknown"  # the label of a request for a model that is not served (never the name it asked for)
MIN_TOKEN_CHARS = 16
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def referral_counts(decisions: Iterable[str]) -> dict[str, int]:
    """How many of a batch's referral decisions refer, do not refer, or have no threshold to decide by."""
    counts = {"referred": 0, "not_referred": 0, "no_threshold": 0}
    for decision in decisions:
        counts["referred" if decision == REFER else "not_referred" if decision == BELOW else "no_threshold"] += 1
    return counts


def with_request(fn: Callable) -> Callable:
    """Let Gradio pass its `gr.Request` to `fn`'s `request` parameter.

    Gradio finds that parameter by its type hint, and a module with `from __future__ import annotations` cannot
    name a gradio it imports lazily, so the hint is set here as the class itself.
    """
    import gradio as gr

    fn.__annotations__["request"] = gr.Request
    return fn


class AuditLog:
    """Appends one JSON object per line to a file: one `write` per line on an O_APPEND descriptor, under a lock.

    The file is opened for each line, so it can be rotated (moved away) at any time; a new one is created (0640).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(self._open())
        except OSError as err:
            raise ValueError(f"audit log '{self.path}' cannot be opened for appending ({err.strerror}); "
                             "expected a writable file path") from None

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one line (raises OSError when the file cannot be written)."""
        line = (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            handle = self._open()
            try:
                written = os.write(handle, line)
                if written != len(line):
                    raise OSError(f"short write to the audit log ({written} of {len(line)} bytes)")
            finally:
                os.close(handle)


@dataclass
class Call:
    """One request being observed; the handler fills in what it learns (model, images, referral, failure)."""

    endpoint: str
    model: str | None
    user: str | None = None
    request_id: str = ""
    session: str | None = None
    n_images: int = 1
    referral: str | dict[str, int] | None = None
    n_skipped: int | None = None
    error: BaseException | None = field(default=None, repr=False)

    def fail(self, err: BaseException) -> None:
        """Record `err` as the cause, when the handler turns it into another error (a gr.Error) for the user."""
        self.error = err


def _request_fields(request: Any) -> tuple[str | None, str, str | None]:
    """(user, request id, session) of a gr.Request: the id is the proxy's X-Request-ID when it looks like one."""
    if request is None:
        return None, uuid.uuid4().hex, None
    user = getattr(request, "username", None)
    session = getattr(request, "session_hash", None)
    try:
        headers = request.headers
        given = headers.get("x-request-id") if headers is not None else None
    except (AttributeError, KeyError, TypeError):
        given = None
    request_id = given if isinstance(given, str) and _REQUEST_ID.match(given) else uuid.uuid4().hex
    return (str(user) if user else None), request_id, (str(session) if session else None)


class Ops:
    """The metrics (a private Prometheus registry) and the audit log of one app."""

    def __init__(self, models: Mapping[str, str | None], audit_log: str | Path | None = None) -> None:
        self.models = dict(models)  # served model name -> model_version
        self.audit = AuditLog(audit_log) if audit_log else None
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("endpoint", "model")
        self.requests = Counter("lesionlab_requests", "Requests handled, by endpoint and model.", labels,
                                registry=self.registry)
        self.errors = Counter("lesionlab_request_errors", "Requests that failed, by endpoint, model and error class.",
                              (*labels, "error"), registry=self.registry)
        self.latency = Histogram("lesionlab_request_duration_seconds", "Time to answer a request, by endpoint and "
                                 "model.", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("lesionlab_images", "Images received for analysis, by endpoint and model.", labels,
                              registry=self.registry)
        self.in_progress = Gauge("lesionlab_requests_in_progress", "Requests being handled now, by endpoint.",
                                 ("endpoint",), registry=self.registry)
        self.header_timeouts = Counter("lesionlab_header_timeouts", "Connections closed because their request "
                                       "headers did not arrive in time.", registry=self.registry)
        self.audit_errors = Counter("lesionlab_audit_write_errors", "Audit lines that could not be written.",
                                    registry=self.registry)
        info = Gauge("lesionlab_model_info", "Served models and their versions (always 1).",
                     ("model", "model_version"), registry=self.registry)
        for name, version in self.models.items():
            info.labels(name, version or "").set(1)
        ProcessCollector(registry=self.registry)

    def model_label(self, name: str | None) -> str:
        """`name` when it is a served model, else 'unknown' (labels never carry what a caller typed)."""
        return name if name in self.models else UNKNOWN_MODEL

    @contextmanager
    def observe(self, endpoint: str, model: str | None, request: Any = None, audit: bool = True) -> Iterator[Call]:
        """Count, time and (when `audit`) audit one request; the handler fills in the `Call` it is given.

        An exception leaving the block counts as an error (class name from `Call.fail`'s cause when set) and is
        re-raised; a model name that is not served is recorded as 'unknown'.
        """
        user, request_id, session = _request_fields(request)
        call = Call(endpoint, model, user=user, request_id=request_id, session=session)
        gauge = self.in_progress.labels(endpoint)
        gauge.inc()
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield call
        except BaseException as err:
            failure = call.error or err
            raise
        finally:
            elapsed = time.perf_counter() - start
            gauge.dec()
            label = self.model_label(call.model)
            self.requests.labels(endpoint, label).inc()
            self.latency.labels(endpoint, label).observe(elapsed)
            self.images.labels(endpoint, label).inc(max(0, call.n_images))
            if failure is not None:
                self.errors.labels(endpoint, label, type(failure).__name__).inc()
            if audit and self.audit is not None:
                self._audit(call, label, elapsed, failure)

    def _audit(self, call: Call, model: str, elapsed: float, failure: BaseException | None) -> None:
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": call.request_id,
            "session": call.session,
            "user": call.user,
            "endpoint": call.endpoint,
            "model": model,
            "model_version": self.models.get(model),
            "n_images": call.n_images,
            "referral": call.referral,
            "latency_ms": round(1000 * elapsed, 1),
            "outcome": "error" if failure is not None else "ok",
            "error": type(failure).__name__ if failure is not None else None,
        }
        if call.n_skipped is not None:
            record["n_skipped"] = call.n_skipped
        try:
            self.audit.write(record)
        except OSError as err:
            self.audit_errors.inc()
            log.error("audit line for request %s not written to '%s': %s", call.request_id, self.audit.path, err)

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------- /metrics


def read_token(path: str | Path) -> str:
    """The bearer token in `path` (its first line, stripped); at least 16 characters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics token file '{path}' does not exist; expected a file holding one token")
    lines = path.read_text().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"metrics token file '{path}' holds a token of {len(token)} characters; at least "
                         f"{MIN_TOKEN_CHARS} are required (e.g. `openssl rand -hex 32`)")
    return token


def add_metrics_route(app: Any, ops: Ops, token: str | None, login_required: bool) -> None:
    """GET /metrics on `app`: with a token, only for `Authorization: Bearer <token>`; without one, open when the
    app has no login and refused (403) when it has one."""
    from fastapi.responses import PlainTextResponse, Response

    expected = f"Bearer {token}".encode() if token else None

    def metrics(request: Request) -> Response:  # Request at module level: FastAPI resolves the string hint there
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return PlainTextResponse("metrics need 'Authorization: Bearer <token>'\n", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        elif login_required:
            return PlainTextResponse("metrics are off while logins are on and no metrics token is set; start the "
                                     "server with --metrics-token-file\n", status_code=403)
        return Response(ops.metrics_text(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


# --------------------------------------------------------------------------------------------- header timeout


class HeaderTimeout:
    """Closes HTTP/1 connections that have not completed a request's headers within `timeout_s` of opening (or of
    their last response).

    uvicorn has no such timer: its keep-alive timer starts only after a first response, and any byte received
    stops it, so a connection that never finishes its headers stays open forever. This checks the server's
    connections on its own event loop every `min(1 s, timeout_s / 4)`; a connection with a request in progress
    (headers complete, response not finished), including a slow upload, is left alone, and so are WebSocket
    connections.
    """

    def __init__(self, server: Any, timeout_s: float, on_close: Callable[[int], None] | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"header timeout must be positive, got {timeout_s} s")
        self.server = server  # a running uvicorn.Server
        self.timeout_s = float(timeout_s)
        self.tick_s = min(1.0, self.timeout_s / 4)
        self.on_close = on_close
        self._waiting: dict[Any, tuple[Any, float]] = {}  # connection -> (its last cycle, when it began waiting)

    def start(self) -> None:
        """Begin checking on the server's event loop (call once the server has started)."""
        servers = getattr(self.server, "servers", None)
        if not servers:
            raise RuntimeError("the header timeout needs a started uvicorn server")
        loop = servers[0].get_loop()
        loop.call_soon_threadsafe(self._check, loop)

    def _check(self, loop: Any) -> None:
        if getattr(self.server, "should_exit", False):
            return
        now = loop.time()
        waiting: dict[Any, tuple[Any, float]] = {}
        closed = 0
        for connection in list(self.server.server_state.connections):
            state = _awaiting_headers(connection)
            if state is _BUSY:
                continue
            cycle = state
            since = self._waiting.get(connection)
            if since is None or since[0] is not cycle:
                since = (cycle, now)
            if now - since[1] >= self.timeout_s:
                connection.transport.close()
                closed += 1
            else:
                waiting[connection] = since
        self._waiting = waiting
        if closed:
            log.info("closed %d connection(s) whose request headers did not arrive within %g s", closed,
                     self.timeout_s)
            if self.on_close is not None:
                self.on_close(closed)
        loop.call_later(self.tick_s, self._check, loop)


_BUSY = object()


def _awaiting_headers(connection: Any) -> Any:
    """The last request cycle (or None) of an HTTP/1 connection waiting for request headers; _BUSY otherwise."""
    cycle = getattr(connection, "cycle", _BUSY)  # uvicorn's h11 and httptools protocols; WebSockets have none
    transport = getattr(connection, "transport", None)
    if cycle is _BUSY or transport is None or transport.is_closing() or transport.get_protocol() is not connection:
        return _BUSY
    if cycle is not None and not getattr(cycle, "response_complete", True):
        return _BUSY
    return cycle
