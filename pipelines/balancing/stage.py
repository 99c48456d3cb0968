"""The `balancing` stage of `lesionlab run`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.balancing.bundle import balance_bundle
from pipelines.balancing.pixel import pixel_smote
from pipelines.balancing.settings import load_balancing_config
from pipelines.stage import StageOutputs

if TYPE_CHECKING:
    from pipelines.config import RunConfig

__all__ = ["run_balancing_stage"]


def run_balancing_stage(
    config: RunConfig, run_dir: str | Path, manifest_path: str | Path | None = None
) -> StageOutputs:
    """`lesionlab run` stage: balance run_dir/bundle into run_dir/bundle_balanced (or write a pixel-SMOTE manifest)."""
    from pipelines.manifest import read_manifest, write_manifest

    settings = load_balancing_config(config.balancing)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path or run_dir / "manifest.csv")
    out = run_dir / "balancing"
    if settings.space == "pixel":
        manifest, report = pixel_smote(read_manifest(manifest_path), out / "pixel_smote", settings)
        # Not returned as `manifest`: later stages keep the run's own manifest; retraining on this one is explicit.
        path = write_manifest(manifest, out / "manifest_pixel_smote.csv")
        files = {"pixel_manifest": path}
        if report["contact_sheet"]:
            files["contact_sheet"] = Path(report["contact_sheet"])
        return StageOutputs(report=out / "pixel_smote" / "pixel_smote.json", files=files,
                            summary={"synthetic_images": report["synthetic_images"]})
    bundle = run_dir / "bundle"
    if not (bundle / "card.json").is_file():
        raise FileNotFoundError(f"balancing needs the trained bundle '{bundle}'; the train stage did not write one")
    report = balance_bundle(bundle, manifest_path, run_dir / "bundle_balanced", settings,
                            config.training.target_sensitivity, out)
    return StageOutputs(bundle=Path(report["bundle"]), report=Path(report["report"]))
