"""Folders named after the process that writes them (`.NAME.partial-PID`), and whether that process
still lives: what lets a later run remove the leftovers of a killed one, and never a live writer's."""

from __future__ import annotations

import os
import re
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def dead_writers(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Folders under `folder` whose name matches `pattern` (with a `pid` group) and whose writer is gone."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and int(match["pid"]) != os.getpid() and not alive(int(match["pid"])):
            found.append(path)
    return sorted(found)
