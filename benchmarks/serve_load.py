"""Load test of the running web app: C parallel gradio_client clients x R /classify requests each.

    .venv/bin/python benchmarks/serve_load.py ../shared/data/ham10000 --models models/ [--clients 16 --requests 20]
    .venv/bin/python benchmarks/serve_load.py ../shared/data/ham10000 --url http://127.0.0.1:7860/

Starts `lesionlab serve` in a subprocess (unless --url is given), waits for it, then every client (a thread with its
own gradio_client.Client) uploads real images in turn. Reports errors (must be 0), p50/p95 latency per request
(upload + queue + analysis + download of the heat-maps) and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_up(url: str, process: subprocess.Popen | None, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise SystemExit(f"the server exited with code {process.returncode}") from None
            time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not answer within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset folder with an images/ sub-folder (e.g. ../shared/data/ham10000)")
    parser.add_argument("--url", help="an already running server; otherwise one is started")
    parser.add_argument("--models", default=str(ROOT / "models" / "default_bundle"), help="bundle(s) to serve")
    parser.add_argument("--model", default="", help="model name to request (default: the server's default)")
    parser.add_argument("--concurrency", type=int, default=2, help="server-side queue concurrency")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    files = sorted((Path(args.data) / "images").glob("*.jpg"))[: args.clients * args.requests]
    if not files:
        raise SystemExit(f"no .jpg images under {Path(args.data) / 'images'}")

    process = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "GRADIO_TEMP_DIR": tempfile.mkdtemp(prefix="serve-load-")}
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--models", args.models, "--port", str(port),
             "--concurrency", str(args.concurrency)], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    try:
        _wait_up(url, process)
        clients = [Client(url, verbose=False) for _ in range(args.clients)]
        model = args.model or None
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def run(index: int) -> None:
            barrier.wait()
            for r in range(args.requests):
                path = files[(index * args.requests + r) % len(files)]
                start = time.perf_counter()
                try:
                    inputs = [handle_file(str(path))] + ([model] if model else [])
                    result = clients[index].predict(*inputs, api_name="/classify")
                    if not result[-1]["probabilities"]:
                        raise RuntimeError("empty probabilities")
                    with lock:
                        latencies.append(time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    total = args.clients * args.requests
    result = {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "server_concurrency": args.concurrency if process is not None else "as launched",
        "requests": total,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "throughput_per_s": round(len(latencies) / wall, 2),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
