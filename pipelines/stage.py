"""The contract between `lesionlab run` and its stages: a stage is `fn(config, run_dir, manifest) -> StageOutputs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.provenance import run_relative

__all__ = ["StageOutputs"]


@dataclass(frozen=True)
class StageOutputs:
    """What a stage wrote. `manifest` is the manifest the next stage reads (None: the current one is unchanged);
    `bundle` and `report` are the model bundle and the human-readable report it wrote; `files` names any other
    file it wrote (kept in the run record, not passed on); `summary` holds small JSON numbers such as counts."""

    manifest: Path | None = None
    bundle: Path | None = None
    report: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("manifest", "bundle", "report"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "files", {k: Path(v) for k, v in self.files.items()})

    def to_record(self, run_dir: str | Path) -> dict[str, Any]:
        """JSON-ready, with every path relative to the run directory (absolute when outside it)."""
        record: dict[str, Any] = {name: run_relative(value, run_dir) for name in ("manifest", "bundle", "report")
                                  if (value := getattr(self, name)) is not None}
        if self.files:
            record["files"] = {k: run_relative(v, run_dir) for k, v in self.files.items()}
        if self.summary:
            record["summary"] = self.summary
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], run_dir: str | Path) -> StageOutputs:
        """The inverse of `to_record`, paths resolved against the run directory they were read from."""
        def resolve(value: str) -> Path:
            return Path(run_dir) / value  # an absolute entry stays as it is

        return cls(**{name: resolve(record[name]) for name in ("manifest", "bundle", "report") if record.get(name)},
                   files={k: resolve(v) for k, v in (record.get("files") or {}).items()},
                   summary=dict(record.get("summary") or {}))
