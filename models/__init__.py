"""Network definitions and the model bundle format (no files, CLIs or UI here)."""

from models.bundle import Bundle, load_bundle, save_bundle
from models.registry import available_models, build_model

__all__ = ["Bundle", "available_models", "build_model", "load_bundle", "save_bundle"]
