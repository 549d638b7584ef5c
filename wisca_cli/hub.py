"""Where a checkpoint comes from: a local folder, or a Hugging Face hub repo id.

Hub ids go through huggingface_hub's snapshot_download, so its cache, HF_HOME /
HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as they do for every other HF tool.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import WiscaError, reason

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md"]


def resolve_source(src: str, revision: str | None = None) -> tuple[Path, str]:
    """(local folder, description). Local paths win over repo ids."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WiscaError(f"{src}: expected a checkpoint folder, got a file")
        if revision:
            from .options import OptionError
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        return path.resolve(), str(path)
    if not REPO_ID.match(src):
        raise WiscaError(f"{src}: no such folder (and not a hub repo id like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise WiscaError(f"{src}: huggingface_hub is needed for hub repo ids ({e})") from e
    try:
        folder = snapshot_download(repo_id=src, revision=revision, allow_patterns=PATTERNS)
    except LocalEntryNotFoundError as e:
        raise WiscaError(f"{src}: not in the local hub cache and the hub cannot be reached "
                         f"(offline mode or no network)") from e
    except HfHubHTTPError as e:
        raise WiscaError(f"{src}: hub error: {reason(e, 200)}") from e
    except Exception as e:  # network stack, bad revision, ...
        raise WiscaError(f"{src}: cannot fetch from the hub: {type(e).__name__}: "
                         f"{reason(e, 200)}") from e
    where = f"{src}@{revision}" if revision else src
    return Path(folder), f"hub:{where}"
