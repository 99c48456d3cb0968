"""Run provenance: what produced a run directory's outputs (config sections, input hashes, code version).

A run directory must stay auditable after re-runs, copies and moves, so everything here is stored relative to the
run directory and compared by content (SHA-256), never by file names or modification times.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ATTEMPTS_DIR = "configs"
_MISSING = object()
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def value_sha256(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted, so equal values hash equally)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _git_dir(root: Path) -> Path | None:
    git = root / ".git"
    if git.is_file():  # a worktree or submodule: ".git" holds "gitdir: <path>"
        text = git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git = (root / text.split(":", 1)[1].strip()).resolve()
    return git if git.is_dir() else None


def git_commit(root: str | Path) -> str | None:
    """The commit checked out in the git work tree at `root`, read from `.git` (no git executable needed); None when
    `root` is not a checkout or its refs cannot be read."""
    git = _git_dir(Path(root))
    if git is None:
        return None
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head if _SHA.match(head) else None
    ref = head.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():  # a linked worktree keeps its branches in the main repository
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in dict.fromkeys((git, common)):
        if (base / ref).is_file():
            sha = (base / ref).read_text().strip()
            return sha if _SHA.match(sha) else None
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                    return parts[0]
    return None


@functools.cache
def code_version() -> dict[str, str | None]:
    """The lesionlab package version and the git commit of the source tree it runs from (None when unknown)."""
    try:
        version = importlib.metadata.version("lesionlab")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"lesionlab": version, "git_commit": git_commit(Path(__file__).resolve().parent.parent)}


def config_sections(config: Any, sections: Iterable[str]) -> dict[str, Any]:
    """The named top-level sections of a run config, as plain JSON values (None for an absent optional section)."""
    dumped = config.model_dump(mode="json")
    return {name: dumped.get(name) for name in sections}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"section.field": value}; lists and scalars are leaves."""
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`section.field: old -> new` for every field that differs between two config-section records."""
    before, after = flatten(old), flatten(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, _MISSING), after.get(key, _MISSING)
        if a != b:
            show = [("unset" if v is _MISSING else repr(v)) for v in (a, b)]
            changes.append(f"{key}: {show[0]} -> {show[1]}")
    return changes


def run_relative(path: str | Path, run_dir: str | Path) -> str:
    """`path` relative to the run directory when it lies inside it, otherwise absolute (POSIX separators)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(run_dir))).as_posix()
    except ValueError:
        return absolute.as_posix()


def describe_input(path: str | Path, run_dir: str | Path) -> dict[str, str | None]:
    """An input file as {path (run-relative when inside the run), sha256 (None when it does not exist)}."""
    return {"path": run_relative(path, run_dir), "sha256": file_sha256(path) if Path(path).is_file() else None}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary file and a rename, so a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def attempt_path(run_dir: str | Path, attempt: int) -> Path:
    """Where the config of attempt `attempt` of a run directory is kept."""
    return Path(run_dir) / ATTEMPTS_DIR / f"attempt-{attempt}.yaml"


def record_attempt(config: Any, run_dir: str | Path) -> int:
    """Keep this config as the run directory's next attempt (`configs/attempt-<n>.yaml`) and as `config.yaml`.

    The attempt files are never rewritten, so the config that produced any stage's outputs (its marker says which
    attempt) stays readable after later attempts; a `config.yaml` left by an older lesionlab without attempt files is
    kept as `configs/attempt-0.yaml`.
    """
    run_dir = Path(run_dir)
    folder = run_dir / ATTEMPTS_DIR
    numbers = [int(m.group(1)) for p in folder.glob("attempt-*.yaml") if (m := re.fullmatch(r"attempt-(\d+)\.yaml",
                                                                                              p.name))]
    legacy = run_dir / "config.yaml"
    if not numbers and legacy.is_file():
        atomic_write_text(attempt_path(run_dir, 0), legacy.read_text())
    attempt = max(numbers, default=0) + 1
    text = yaml.safe_dump(config.model_copy(update={"run_dir": str(run_dir)}).model_dump(mode="json"),
                          sort_keys=False)
    atomic_write_text(attempt_path(run_dir, attempt), text)
    atomic_write_text(legacy, text)
    return attempt
