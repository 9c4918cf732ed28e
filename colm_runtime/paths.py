"""Where the embedded default models live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("COLM_MODELS_DIR", REPO_ROOT / "models"))
DEFAULT_MODEL_NAME = "colm-tiny"


def default_model_dir() -> Path:
    """COLM_MODEL if set, else models/colm-tiny of this checkout (or of COLM_MODELS_DIR)."""
    return Path(os.environ.get("COLM_MODEL", MODELS_DIR / DEFAULT_MODEL_NAME))
