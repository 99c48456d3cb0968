"""Pipeline stages: manifest, transforms, captions, synthesis, balancing, training, evaluation, pruning, CLI."""

import os

# Offline and private by default; a user who sets these explicitly keeps their value.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)
