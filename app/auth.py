"""Logins for the web app: a file of `username:<scrypt hash>` lines, never a plain password.

A line reads `name:scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>` (hashlib.scrypt, 32-byte key). The file is what
an operator mounts as a secret; `lesionlab users add` (`app.cli`) writes it, `lesionlab serve --auth-file` reads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

__all__ = [
    "MIN_PASSWORD_CHARS",
    "AuthFileError",
    "LoginChecker",
    "add_user",
    "hash_password",
    "read_users",
    "verify_password",
]

SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES = 2**14, 8, 1, 32
MIN_PASSWORD_CHARS = 10
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


class AuthFileError(ValueError):
    """The login file or a login is malformed; the message names the line or the item."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The stored form of `password`: `scrypt$n$r$p$salt$key`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES)
    encode = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a stored `scrypt$...` hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def read_users(path: str | Path) -> dict[str, str]:
    """Usernames and their stored hashes; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"login file '{path}' does not exist; create it with `lesionlab users add`")
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, stored = line.partition(":")
        if not NAME.match(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise AuthFileError(f"login file '{path}' line {number}: expected 'username:scrypt$n$r$p$salt$key' "
                                "(written by `lesionlab users add`)")
        users[name] = stored
    if not users:
        raise AuthFileError(f"login file '{path}' holds no user; add one with `lesionlab users add`")
    return users


def add_user(path: str | Path, name: str, password: str) -> None:
    """Add `name` (or replace its password) in the login file, written atomically with mode 0600."""
    if not NAME.match(name):
        raise AuthFileError(f"username '{name}' is not allowed; expected 1-64 letters, digits or . _ @ -")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthFileError(f"the password for '{name}' has {len(password)} characters; at least "
                            f"{MIN_PASSWORD_CHARS} are required")
    path = Path(path)
    users = read_users(path) if path.is_file() and path.stat().st_size else {}
    users[name] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".users-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write("".join(f"{user}:{stored}\n" for user, stored in users.items()))
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class LoginChecker:
    """The `auth` callable Gradio asks for every login: (username, password) -> allowed."""

    def __init__(self, path: str | Path) -> None:
        self.users = read_users(path)
        self._unknown = hash_password(secrets.token_hex(16))  # unknown names cost the same work as known ones

    def __call__(self, username: str, password: str) -> bool:
        stored = self.users.get(username)
        return verify_password(password, stored or self._unknown) and stored is not None
