"""The process's own resources, tuned for training on a CPU: the C allocator (allocator.py) and OpenMP's
threads (threads.py); the hub (hub.py), processes' leftovers (processes.py), signal handlers (signals.py);
where lorakit keeps its caches. Depends on nothing else in lorakit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """lorakit's cache folder: $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit (prepared data, flattened
    adapters, vLLM's logs)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
