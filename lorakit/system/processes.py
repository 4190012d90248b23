"""Folders named after the process that writes them (`.NAME.partial-PID@HOST`), and whether that process
still lives: what lets a later run remove the leftovers of a killed one, and never a live writer's, even on a
folder that several machines share (another machine's PIDs say nothing here: its leftovers are left alone)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def writer() -> str:
    """This process, as folder names and lock files carry it: PID@HOST."""
    return f"{os.getpid()}@{HOST}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def dead_writers(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Folders under `folder` whose name matches `pattern` (with a `pid` group, and an optional `host` one) and
    whose writer, a process of this machine, is gone."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if not match or match.groupdict().get("host") not in (None, HOST):
            continue
        if path.is_dir() and int(match["pid"]) != os.getpid() and not alive(int(match["pid"])):
            found.append(path)
    return sorted(found)


_BOUND_TO: int | None = None
_REGISTERED: set[int] = set()


class _Hook:
    """What multiprocessing's after-fork registry keeps alive (it holds its objects weakly)."""


_HOOK = _Hook()


def children_die_with_me() -> None:
    """Every process that (multiprocess or multiprocessing) forks from now on is killed when this one dies:
    datasets.map's pool workers and the manager process it starts for progress, which a killed preparation
    otherwise left running as orphans for ever."""
    import importlib

    parent = os.getpid()
    if parent in _REGISTERED:
        return
    _REGISTERED.add(parent)
    for name in ("multiprocess.util", "multiprocessing.util"):
        try:
            util = importlib.import_module(name)
        except ImportError:
            continue
        util.register_after_fork(_HOOK, lambda _: die_with(parent))


def die_with(parent: int) -> None:
    """In a process forked by `parent`: be killed when `parent` dies (Linux: PR_SET_PDEATHSIG; elsewhere
    nothing)."""
    global _BOUND_TO
    if os.getpid() == parent or _BOUND_TO == parent:
        return
    _BOUND_TO = parent
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above: nobody will signal
        os._exit(1)
