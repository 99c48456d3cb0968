"""Operations of a live server: GET /metrics (Prometheus text), the JSON-lines audit log, the header timeout."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from conftest_app import SAMPLE_IMAGES, models_dir, serving  # noqa: F401
from prometheus_client.parser import text_string_to_metric_families

from app.auth import add_user
from app.wording import BELOW, NO_REFERRAL, REFER

PASSWORD = "correct horse battery"
TOKEN = "metrics-token-0123456789abcdef"
HEADER_TIMEOUT_S = 2.0
# Names a clinician might give a file: none of them may reach the metrics or the audit log.
PRIVATE_NAME = "jane-doe-1957-03-02"
BAD_NAME = "notes-of-john-smith"
AUDIT_KEYS = {"time", "request_id", "session", "user", "endpoint", "model", "model_version", "n_images", "referral",
              "latency_ms", "outcome", "error"}


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):  # noqa: F811
    """A server with logins, an audit log, a metrics token and a 2 s header timeout."""
    folder = tmp_path_factory.mktemp("ops")
    add_user(folder / "users", "ward1", PASSWORD)
    (folder / "token").write_text(TOKEN + "\n")
    audit = folder / "logs" / "audit.jsonl"
    with serving(models_dir, tmp_path_factory.mktemp("gradio-ops"), max_file_mb=1.0,
                 auth_file=str(folder / "users"), audit_log=str(audit),
                 metrics_token_file=str(folder / "token"), header_timeout_s=HEADER_TIMEOUT_S) as (demo, url):
        yield url, audit, demo


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served[0], auth=("ward1", PASSWORD), verbose=False, headers={"X-Request-ID": "ward1-req-0001"},
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def metrics_text(url: str, token: str | None = TOKEN) -> str:
    request = urllib.request.Request(url + "metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def copy_as(source: Path, folder: Path, name: str) -> Path:
    target = folder / name
    target.write_bytes(source.read_bytes())
    return target


# ----------------------------------------------------------------------------------------------- metrics


def test_metrics_count_a_classify_with_its_latency_and_never_name_the_file(served, client, tmp_path):
    from gradio_client import handle_file

    url, audit, _ = served
    before = metrics_text(url)
    image = copy_as(SAMPLE_IMAGES / "ISIC_0024307.jpg", tmp_path, f"{PRIVATE_NAME}.jpg")
    details = client.predict(handle_file(str(image)), "cnn", api_name="/classify")[-1]
    assert details["model"] == "cnn"
    after = metrics_text(url)

    assert sample(after, "lesionlab_requests_total", endpoint="classify", model="cnn") == \
        sample(before, "lesionlab_requests_total", endpoint="classify", model="cnn") + 1
    assert sample(after, "lesionlab_images_total", endpoint="classify", model="cnn") >= 1
    assert sample(after, "lesionlab_request_duration_seconds_count", endpoint="classify", model="cnn") >= 1
    assert re.search(r'^lesionlab_request_duration_seconds_bucket\{endpoint="classify",le="\+Inf",model="cnn"\} '
                     r"[1-9]", after, re.MULTILINE), "a latency histogram bucket line"
    assert sample(after, "lesionlab_model_info", model="lite0") == 1
    assert sample(after, "lesionlab_requests_in_progress", endpoint="classify") == 0
    for text in (after, audit.read_text()):
        assert PRIVATE_NAME not in text and "ISIC_0024307" not in text
    assert "ward1" not in after  # no user names in the metrics either


def test_metrics_need_the_token(served):
    url = served[0]
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "metrics", headers=headers), timeout=10)
        assert refused.value.code == 401
    assert "# TYPE lesionlab_requests_total counter" in metrics_text(url)


def test_metrics_policy_without_a_token():
    """No token: open without logins (like the app itself), refused with logins (a login page is not for scrapers)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.ops import Ops, add_metrics_route

    for login, expected in ((False, 200), (True, 403)):
        app = FastAPI()
        add_metrics_route(app, Ops({"cnn": "1.0"}), None, login_required=login)
        response = TestClient(app).get("/metrics")
        assert response.status_code == expected, login
        assert ('lesionlab_model_info{model="cnn",model_version="1.0"} 1.0' in response.text) == (not login)


# ----------------------------------------------------------------------------------------------- audit log


def test_audit_log_one_line_per_request_with_the_user_and_no_file_names(served, client, tmp_path):
    from gradio_client import handle_file

    audit = served[1]
    start = len(audit_lines(audit))
    image = copy_as(SAMPLE_IMAGES / "ISIC_0024307.jpg", tmp_path, f"{PRIVATE_NAME}.jpg")
    details = client.predict(handle_file(str(image)), "lite0", api_name="/classify")[-1]
    batch = [copy_as(SAMPLE_IMAGES / "ISIC_0024337.jpg", tmp_path, f"{PRIVATE_NAME}-2.jpg"), image,
             tmp_path / f"{BAD_NAME}.png"]
    batch[2].write_bytes(b"not an image at all\n" * 10)
    client.predict([handle_file(str(p)) for p in batch], "cnn", api_name="/classify_batch")

    single, several = audit_lines(audit)[start:]
    assert AUDIT_KEYS <= set(single) and AUDIT_KEYS <= set(several)
    assert single["endpoint"] == "classify" and several["endpoint"] == "classify_batch"
    for line in (single, several):
        assert line["user"] == "ward1" and line["outcome"] == "ok" and line["error"] is None
        assert line["request_id"] == "ward1-req-0001"  # the proxy's X-Request-ID, for matching its access log
        assert line["latency_ms"] > 0 and line["session"]
        assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert single["model"] == "lite0" and single["n_images"] == 1
    assert single["referral"] == details["referral"] and single["referral"] in (REFER, BELOW, NO_REFERRAL)
    assert several["model"] == "cnn" and several["n_images"] == 3 and several["n_skipped"] == 1
    assert set(several["referral"]) == {"referred", "not_referred", "no_threshold"}
    assert sum(several["referral"].values()) == 2
    text = audit.read_text()
    for private in (PRIVATE_NAME, BAD_NAME, "ISIC_00243", "prob", "P(malignant)"):
        assert private not in text, private
    assert text.endswith("\n") and all(line.startswith("{") for line in text.splitlines())


def test_a_failed_request_is_counted_and_audited_as_an_error(served, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, audit, _ = served
    before = metrics_text(url)
    start = len(audit_lines(audit))
    bad = tmp_path / f"{BAD_NAME}.jpg"
    bad.write_bytes(b"Patient notes, definitely not a JPEG\n" * 20)
    with pytest.raises(AppError, match="is not a readable image"):
        client.predict(handle_file(str(bad)), "cnn", api_name="/classify")
    after = metrics_text(url)
    errors = {"endpoint": "classify", "model": "cnn", "error": "ImageError"}
    assert sample(after, "lesionlab_request_errors_total", **errors) == \
        sample(before, "lesionlab_request_errors_total", **errors) + 1
    (line,) = audit_lines(audit)[start:]
    assert line["outcome"] == "error" and line["error"] == "ImageError" and line["referral"] is None
    assert line["user"] == "ward1" and line["model"] == "cnn"
    assert BAD_NAME not in audit.read_text() and BAD_NAME not in after


def test_every_observed_handler_is_given_the_request(served):
    """Gradio passes gr.Request (the user name) only to a parameter it recognises by its type hint."""
    import gradio as gr
    from gradio.utils import get_type_hints

    handlers = {f.fn.__name__: f.fn for f in served[2].fns.values()}
    for name in ("classify", "reanalyse", "classify_batch", "model_card"):
        assert get_type_hints(handlers[name]).get("request") is gr.Request, name


def test_audit_appends_are_whole_lines_under_concurrency(tmp_path):
    from app.ops import AuditLog, Ops

    ops = Ops({"cnn": "2.1"}, tmp_path / "audit.jsonl")

    def work(worker: int) -> None:
        for i in range(50):
            with ops.observe("classify", "cnn") as call:
                call.referral = REFER if (worker + i) % 2 else BELOW

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = audit_lines(tmp_path / "audit.jsonl")
    assert len(lines) == 400 and {line["model_version"] for line in lines} == {"2.1"}
    assert len({line["request_id"] for line in lines}) == 400
    assert sample(ops.metrics_text().decode(), "lesionlab_requests_total", endpoint="classify", model="cnn") == 400
    with pytest.raises(ValueError, match="audit log .* cannot be opened for appending"):
        AuditLog(tmp_path)  # a folder, not a file


def test_serve_flags_and_environment(monkeypatch, tmp_path):
    from app.cli import settings_from_args
    from pipelines.cli import build_parser

    monkeypatch.setenv("LESIONLAB_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("LESIONLAB_METRICS_TOKEN_FILE", str(tmp_path / "token"))
    settings = settings_from_args(build_parser().parse_args(["serve", "--header-timeout", "3"]))
    assert settings.audit_log == str(tmp_path / "audit.jsonl") and settings.header_timeout_s == 3.0
    assert settings.metrics_token_file == str(tmp_path / "token")
    args = build_parser().parse_args(["serve", "--audit-log", "/srv/a.jsonl", "--header-timeout", "0"])
    assert settings_from_args(args).audit_log == "/srv/a.jsonl" and settings_from_args(args).header_timeout_s is None
    assert settings_from_args(build_parser().parse_args(["serve"])).header_timeout_s == 15.0
    with pytest.raises(ValueError, match="--header-timeout must be positive"):
        settings_from_args(build_parser().parse_args(["serve", "--header-timeout", "-1"]))


# ----------------------------------------------------------------------------------------------- header timeout


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (EOF or reset); sends nothing itself."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(4096) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def test_connections_without_complete_headers_are_closed(served):
    url = served[0]
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    before = sample(metrics_text(url), "lesionlab_header_timeouts_total")
    stalled = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:  # half send a partial request line and header, the others nothing at all
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stalled.append(sock)
    # A request whose headers are complete but whose body comes late is in progress, not stalled: it is answered.
    body = f"username=ward1&password={PASSWORD.replace(' ', '+')}".encode()
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    opened = time.monotonic()
    try:
        time.sleep(HEADER_TIMEOUT_S / 2)
        assert not any(_closed_by_server(sock, time.monotonic() + 0.01) for sock in stalled), "closed too early"
        deadline = opened + HEADER_TIMEOUT_S + 4.0  # the timeout, one check interval and slack for a busy machine
        closed = [_closed_by_server(sock, deadline) for sock in stalled]
        assert all(closed), f"{closed.count(False)} of 20 stalled connections still open"
        slow.sendall(body)
        slow.settimeout(10)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200"), "the slow upload was cut off"
    finally:
        for sock in [*stalled, slow]:
            sock.close()
    with urllib.request.urlopen(url + "healthz", timeout=10) as response:
        assert response.status == 200
    assert sample(metrics_text(url), "lesionlab_header_timeouts_total") >= before + 20
