"""Logins: the login file holds scrypt hashes only, and with it set every page, upload and API call needs a login."""

from __future__ import annotations

import io
import os
import stat
import urllib.error
import urllib.request

import pytest
from conftest_app import SAMPLE_IMAGES, models_dir, serving  # noqa: F401

from app.auth import AuthFileError, LoginChecker, add_user, hash_password, read_users, verify_password

PASSWORD = "correct horse battery"


def test_hash_round_trip_and_file_never_holds_the_password(tmp_path):
    stored = hash_password(PASSWORD)
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "!", stored)
    assert hash_password(PASSWORD) != stored  # salted
    login_file = tmp_path / "users"
    add_user(login_file, "dr.smith", PASSWORD)
    add_user(login_file, "nurse", "another long password")
    add_user(login_file, "dr.smith", "a changed password")  # replaces, keeps the other user
    text = login_file.read_text()
    assert PASSWORD not in text and "changed" not in text and text.count("\n") == 2
    assert stat.S_IMODE(os.stat(login_file).st_mode) == 0o600
    check = LoginChecker(login_file)
    assert check("dr.smith", "a changed password") and not check("dr.smith", PASSWORD)
    assert not check("nobody", PASSWORD) and check("nurse", "another long password")


def test_bad_logins_and_files_are_named(tmp_path):
    with pytest.raises(AuthFileError, match="username 'a b' is not allowed"):
        add_user(tmp_path / "u", "a b", PASSWORD)
    with pytest.raises(AuthFileError, match="has 5 characters; at least 10"):
        add_user(tmp_path / "u", "ok", "short")
    broken = tmp_path / "broken"
    broken.write_text("# users\nalice:plaintext-password\n")
    with pytest.raises(AuthFileError, match="line 2: expected 'username:scrypt"):
        read_users(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_users(tmp_path / "missing")


def test_users_add_command_reads_the_password_from_stdin(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    login_file = tmp_path / "secrets" / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "--auth-file", str(login_file), "ward1", "--password-stdin"]) == 0
    assert LoginChecker(login_file)("ward1", PASSWORD)
    assert main(["users", "add", "--auth-file", str(login_file), "ward2"]) == 2
    assert "--password-stdin" in capsys.readouterr().err


@pytest.fixture(scope="module")
def protected(models_dir, tmp_path_factory):  # noqa: F811
    login_file = tmp_path_factory.mktemp("auth") / "users"
    add_user(login_file, "ward1", PASSWORD)
    with serving(models_dir, tmp_path_factory.mktemp("gradio-auth"), auth_file=str(login_file)) as (demo, url):
        yield url


def test_with_a_login_file_everything_but_health_needs_a_login(protected):
    from gradio_client import Client, handle_file

    for path in ("config", "gradio_api/info", "gradio_api/upload"):
        request = urllib.request.Request(protected + path, method="POST" if path.endswith("upload") else "GET")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403), path
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different errors across versions
        Client(protected, verbose=False).predict(handle_file(str(SAMPLE_IMAGES / "ISIC_0024307.jpg")), "cnn",
                                                api_name="/classify")
    with pytest.raises(Exception):  # noqa: B017
        Client(protected, auth=("ward1", "wrong password!"), verbose=False)
    client = Client(protected, auth=("ward1", PASSWORD), verbose=False)
    result = client.predict(handle_file(str(SAMPLE_IMAGES / "ISIC_0024307.jpg")), "cnn", api_name="/classify")
    assert result[-1]["model"] == "cnn"
    with urllib.request.urlopen(protected + "healthz", timeout=10) as response:  # for the container's health check
        assert response.status == 200
