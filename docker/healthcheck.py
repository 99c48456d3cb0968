"""Docker HEALTHCHECK: exit 0 when the web app answers on its port, 1 otherwise."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def runs_server(cmdline_path: str = "/proc/1/cmdline") -> bool:
    """Whether the container's main process is `lesionlab serve` (one-shot predict/train containers are not)."""
    try:
        with open(cmdline_path, "rb") as handle:
            args = handle.read().split(b"\0")
    except OSError:
        return True  # cannot tell: probe anyway
    return b"serve" in args


def probe(url: str, timeout_s: float = 4.0) -> str | None:
    """None when `url` answers with HTTP 2xx/3xx, else a message saying what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if 200 <= response.status < 400:
                return None
            return f"{url} answered HTTP {response.status}; expected 2xx or 3xx"
    except urllib.error.HTTPError as err:
        return f"{url} answered HTTP {err.code}; expected 2xx or 3xx"
    except (urllib.error.URLError, OSError) as err:
        return f"{url} did not answer: {err}"


def main() -> int:
    """Probe http://127.0.0.1:$LESIONLAB_PORT$LESIONLAB_HEALTH_PATH when the container runs the server."""
    if not runs_server():
        return 0
    port = os.environ.get("LESIONLAB_PORT", "7860")
    path = os.environ.get("LESIONLAB_HEALTH_PATH", "/healthz")
    problem = probe(f"http://127.0.0.1:{port}{path}", float(os.environ.get("LESIONLAB_HEALTH_TIMEOUT", "4")))
    if problem:
        sys.stderr.write(f"healthcheck: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
