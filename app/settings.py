"""What `lesionlab serve` can configure, in one frozen dataclass (light to import: the CLI builds it from flags)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.images import ImageLimits

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """What `lesionlab serve` can configure: request concurrency, input limits and how long files live."""

    concurrency: int = 2
    max_file_mb: float = 25.0
    max_megapixels: float = 50.0
    max_batch_files: int = 200
    queue_size: int = 256
    # An upload is deleted this long after the last request using it ends. Identical uploads share one file in
    # Gradio's cache, so the grace must cover an identical upload's wait in the queue.
    upload_grace_s: float = 15.0
    output_max_age_s: int = 900  # heat-maps and CSVs handed to the browser are deleted after this
    session_ttl_s: int = 1800  # the last uploaded image kept in memory (for switching models) per browser session
    tta: int | None = None  # test-time-augmentation views; None: what each bundle was validated with
    engine: str = "auto"  # network runtime (pipelines.export): auto runs a bundle's exported ONNX file when it has one
    auth_file: str | None = None  # login file (app.auth); None: no login
    audit_log: str | None = None  # JSON-lines audit file (app.ops), one line per analysis; None: no audit log
    metrics_token_file: str | None = None  # bearer token for GET /metrics; needed for /metrics when logins are on
    header_timeout_s: float | None = 15.0  # close connections whose request headers are not complete by then

    def limits(self, min_side: int = 32) -> ImageLimits:
        """The image limits these settings describe."""
        return ImageLimits(
            max_bytes=int(self.max_file_mb * 2**20), max_pixels=int(self.max_megapixels * 1e6), min_side=min_side
        )
