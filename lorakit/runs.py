"""What keeps a long run safe: the output lock, the run folder with its checkpoints, resume, signals,
and the disk-space check.

    adapters/.<name>.lock      held (flock) while a run writes adapters/<name>; the kernel frees it
                               when the process dies, so a killed run never blocks the next one
    adapters/.<name>.run/      checkpoint-N/ (adapter, optimizer, scheduler, RNG, data position),
                               metrics.jsonl, recipe.yaml; kept until the adapter is published
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import yaml

from .errors import LorakitError


class Interrupted(LorakitError):
    """Ctrl-C or SIGTERM: a checkpoint was written; the run can be resumed."""

    exit_code = 130


class NonFiniteLoss(LorakitError):
    """The loss became NaN or infinite: training stopped before an optimizer step used it."""


def run_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.run"


@contextlib.contextmanager
def output_lock(out: Path):
    """Refuse a second run writing the same output while this one lives."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LorakitError(f"{out} is being written by another lorakit run (pid {handle.read().strip() or '?'}); "
                               f"wait for it or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def begin(out: Path, recipe_dict: dict, resume: bool) -> Path | None:
    """Prepare the run folder; return the checkpoint to resume from (None for a fresh run)."""
    folder = run_folder(out)
    saved = folder / "recipe.yaml"
    checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
    if not resume:
        if checkpoint is not None:
            raise LorakitError(f"an interrupted run of {out} left checkpoints in {folder}: continue it with "
                               f"--resume, or delete that folder to start over")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        saved.write_text(yaml.safe_dump(recipe_dict, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return None
    if checkpoint is None:
        raise LorakitError(f"nothing to resume for {out}: no checkpoint in {folder}")
    before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    changed = _first_difference(before, recipe_dict)
    if changed:
        raise LorakitError(f"the recipe changed since the interrupted run ({changed}); resume with the same recipe")
    return checkpoint


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


@contextlib.contextmanager
def stop_on_signals(flag: dict):
    """While training, Ctrl-C and SIGTERM ask for a checkpoint and a clean stop instead of dying."""
    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Fail before the work, with the figure, when `needed` bytes will not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LorakitError(f"{what} needs about {needed / 2**30:.2f} GiB in {folder}, but only "
                           f"{free / 2**30:.2f} GiB is free")


def trim_metrics(path: Path, step: int) -> list[dict]:
    """On resume: the metrics up to the checkpoint's step (later lines were never kept)."""
    if not path.is_file():
        return []
    kept = [e for e in map(json.loads, path.read_text().splitlines()) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return kept
