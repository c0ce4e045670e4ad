"""Files shared by every stage: the ollama-ft cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$OLLAMA_FT_CACHE, else $XDG_CACHE_HOME/ollama-ft, else ~/.cache/ollama-ft."""
    env = os.environ.get("OLLAMA_FT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ollama-ft"
