"""Temporary files of the web app: the janitor that deletes uploads and outputs, and the private scratch folders.

Every folder the server writes is named after its process (`lesionlab-out-<pid>-...`, `lesionlab-gradio-<pid>-...`)
and removed when the process exits; `remove_leftovers` removes those of a server that was killed outright.
"""

from __future__ import annotations

import atexit
import heapq
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["GRADIO_PREFIX", "OUTPUT_PREFIX", "FileJanitor", "remove_leftovers", "scratch_dir"]

log = logging.getLogger(__name__)


class FileJanitor:
    """Deletes uploads soon after the last request that uses them, and our own output files after a while.

    Gradio stores an upload at `<cache>/<sha256 of content>/<name>`, so identical uploads share one file: an upload
    is deleted `grace_s` after the last request holding it ends (a reference count and a due time per path), and
    not at all when an identical upload has replaced the file since (that upload's request deletes it).
    One background thread does every deletion.
    """

    def __init__(self, root: str | Path, grace_s: float) -> None:
        self.root = Path(root).resolve()
        self.grace_s = grace_s
        self._holds: dict[Path, int] = {}
        self._inodes: dict[Path, int] = {}  # the file each upload path held when a request last took it
        self._due: dict[Path, float] = {}
        self._queue: list[tuple[float, str]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            return False
        return True

    def hold(self, paths: Sequence[str | Path]) -> list[Path]:
        """Mark uploads as in use; paths outside the upload cache (a local caller's own files) are never touched."""
        held = [Path(p).resolve() for p in paths if p and self._inside(Path(p))]
        with self._wake:
            for path in held:
                self._holds[path] = self._holds.get(path, 0) + 1
                try:
                    self._inodes[path] = path.stat().st_ino
                except OSError:
                    self._inodes.pop(path, None)
        return held

    def release(self, held: Sequence[Path], grace_s: float | None = None) -> None:
        """End a request's use of `held`; each file is deleted once no request has held it for `grace_s` (default:
        the janitor's)."""
        with self._wake:
            for path in held:
                self._holds[path] = max(0, self._holds.get(path, 1) - 1)
        for path in held:
            self.delete_later(path, self.grace_s if grace_s is None else grace_s)

    def delete_later(self, path: str | Path, delay_s: float) -> None:
        """Delete `path` (and its folder, if left empty) in `delay_s` seconds, unless a request holds it then."""
        path = Path(path).resolve()
        due = time.monotonic() + max(0.0, delay_s)
        with self._wake:
            self._due[path] = max(due, self._due.get(path, 0.0))
            heapq.heappush(self._queue, (due, str(path)))
            if delay_s > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lesionlab-janitor", daemon=True)
                self._thread.start()
            self._wake.notify()
        if delay_s <= 0:
            self._sweep()

    def _run(self) -> None:
        while True:
            with self._wake:
                wait = self._queue[0][0] - time.monotonic() if self._queue else None
                if wait is None or wait > 0:
                    self._wake.wait(timeout=wait)
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._wake:
            while self._queue and self._queue[0][0] <= now:
                path = Path(heapq.heappop(self._queue)[1])
                if self._holds.get(path, 0) > 0 or self._due.get(path, 0.0) > now:
                    continue  # in use again, or a later deletion is scheduled
                self._due.pop(path, None)
                self._holds.pop(path, None)
                self._remove(path, self._inodes.pop(path, None))

    def _remove(self, path: Path, inode: int | None) -> None:
        try:
            if inode is not None and path.stat().st_ino != inode:
                return  # an identical upload replaced the file after our request took it: its request owns it
            path.unlink()
            if path.parent != self.root and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError as err:  # already gone, or re-created meanwhile
            log.debug("temporary file not deleted: %s", err)


# --------------------------------------------------------------------------------------------- scratch folders

OUTPUT_PREFIX, GRADIO_PREFIX = "lesionlab-out-", "lesionlab-gradio-"
_SCRATCH = re.compile(rf"^(?:{OUTPUT_PREFIX}|{GRADIO_PREFIX})(\d+)-")


def scratch_dir(prefix: str) -> Path:
    """A private (0700) temporary folder named after this process, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_leftovers(root: str | Path | None = None) -> int:
    """Delete the scratch folders of server processes that no longer run (a killed server); returns how many."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    for entry in root.iterdir() if root.is_dir() else []:
        found = _SCRATCH.match(entry.name)
        if found and entry.is_dir() and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
