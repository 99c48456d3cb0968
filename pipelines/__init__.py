"""Pipeline stages: manifest, transforms, captions, synthesis, balancing, training, evaluation, pruning, prediction.

Importing the package makes the process offline and private by default (`apply_offline_defaults`).
"""

import os

__all__ = ["OFFLINE_DEFAULTS", "apply_offline_defaults"]

# No model-hub downloads, no telemetry, no update checks; a user who sets one of these explicitly keeps their value.
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DO_NOT_TRACK": "1",
}


def apply_offline_defaults() -> None:
    """Set every OFFLINE_DEFAULTS variable the environment does not already set."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


apply_offline_defaults()
