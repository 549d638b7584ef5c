"""File names of the folders wisca reads, and what kind of folder a path is. No torch here:
the read-ahead at start-up (``prefetch``) uses it before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(folder: str | os.PathLike) -> bool:
    """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
