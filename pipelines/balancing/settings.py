"""The `balancing:` section of a run config (fields and checks: `pipelines.config.BalancingConfig`)."""

from __future__ import annotations

from typing import Any

from pipelines.config import BalancingConfig, stage_settings

__all__ = ["load_balancing_config"]


def load_balancing_config(section: dict[str, Any] | BalancingConfig | None) -> BalancingConfig:
    """Validate a run config's `balancing:` section (None means all defaults)."""
    return stage_settings({"balancing": section}, "balancing", BalancingConfig)
