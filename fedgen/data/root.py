"""Where datasets live: the data root and whether fedgen may download into it."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "FEDGEN_DATA_ROOT"


def default_cache_root() -> Path:
    """The user cache folder for datasets: ``$XDG_CACHE_HOME/fedgen/data`` or ``~/.cache/fedgen/data``."""
    cache_home = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache_home) if cache_home else Path.home() / ".cache"
    return base / "fedgen" / "data"


def resolve_data_root(root: str | os.PathLike | None) -> tuple[Path, bool]:
    """Return ``(data root, whether downloading into it is allowed by default)``.

    Order: the explicit ``root`` (no download), else ``$FEDGEN_DATA_ROOT`` (no download),
    else the user cache folder (download allowed).
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser(), False
    env_root = os.environ.get(DATA_ROOT_ENV)
    if env_root:
        return Path(env_root).expanduser(), False
    return default_cache_root(), True
