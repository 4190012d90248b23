"""What keeps a long run safe: the output lock, the run folder with its checkpoints, resume, signals,
and the disk-space check.

    adapters/.<name>.lock      held (flock) while a run writes adapters/<name>; the kernel frees it
                               when the process dies, so a killed run never blocks the next one
    adapters/.<name>.run/      checkpoint-N/ (adapter, optimizer, scheduler, RNG, data position),
                               metrics.jsonl, recipe.yaml, run.json (the run's id and its data's
                               hash); kept until the adapter is published, then removed in one step
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import yaml

from ..errors import LorakitError
from ..log import say
from ..system.signals import handling
from ..weights.outputs import own_manifest, remove_folder

RUN_FILE = "run.json"


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
    """The newest complete checkpoint (the Trainer writes trainer_state.json last)."""
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def drop_incomplete_checkpoints(folder: Path) -> None:
    """Checkpoints a failed write left without trainer_state.json: never resumable, only in the way."""
    for path in folder.glob("checkpoint-*"):
        if path.is_dir() and not (path / "trainer_state.json").is_file():
            shutil.rmtree(path, ignore_errors=True)


def check_run_folder(out: Path, recipe_dict: dict, resume: bool) -> None:
    """Before anything is loaded: a fresh run must not throw an interrupted run's checkpoints away, and
    --resume needs a checkpoint of the same recipe. Leftovers of a run that did finish are removed."""
    folder = run_folder(out)
    if folder.is_dir() and _finished(folder, out):
        say(f"removing {folder}: the checkpoints of a run that finished and published {out}")
        remove_folder(folder)
    checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
    if not resume:
        if checkpoint is not None:
            raise LorakitError(f"an interrupted run of {out} left checkpoints in {folder}: continue it with "
                               f"--resume, or delete that folder to start over")
        return
    if checkpoint is None:
        manifest = own_manifest(out) if out.is_dir() else None
        if manifest is not None:
            raise LorakitError(f"nothing to resume: {out} is complete: {manifest.describe()}")
        raise LorakitError(f"nothing to resume for {out}: no checkpoint in {folder}")
    before = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    changed = _first_difference(before, recipe_dict)
    if changed:
        raise LorakitError(f"the recipe changed since the interrupted run ({changed}); resume with the same recipe")


def _finished(folder: Path, out: Path) -> bool:
    """A run folder whose run already published `out` (its cleanup was cut short), or one that lost its
    recipe.yaml to a cut-short cleanup of an older lorakit (written first, so only removal loses it)."""
    if not (folder / "recipe.yaml").is_file():
        return True
    run_id = _read_json(folder / RUN_FILE).get("id")
    manifest = own_manifest(out) if out.is_dir() else None
    return bool(run_id) and manifest is not None and manifest.run_id == run_id


def begin(out: Path, recipe_dict: dict, data_facts: dict, resume: bool) -> tuple[str, Path | None]:
    """Prepare the run folder; return the run's id and the checkpoint to resume from (None: fresh run).

    On --resume the data must be what the interrupted run trained on (`data_facts`: its hash and row
    count), or the resumed run would silently continue on other data."""
    folder = run_folder(out)
    if not resume:
        remove_folder(folder)
        folder.mkdir(parents=True)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False, allow_unicode=True),
                                            encoding="utf-8")
        run_id = uuid.uuid4().hex
        (folder / RUN_FILE).write_text(json.dumps({"id": run_id, "data": data_facts}), encoding="utf-8")
        return run_id, None
    saved = _read_json(folder / RUN_FILE)
    before = saved.get("data")
    if before and before.get("hash") != data_facts.get("hash"):
        raise LorakitError(f"the data changed since the interrupted run (hash {before.get('hash')} -> "
                           f"{data_facts.get('hash')}, {before.get('rows')} -> {data_facts.get('rows')} rows); resume "
                           f"with the same data, or delete {folder} to start over")
    drop_incomplete_checkpoints(folder)
    return saved.get("id") or uuid.uuid4().hex, latest_checkpoint(folder)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


class StopRequest:
    """Set by Ctrl-C or SIGTERM while training: the progress callback checkpoints the step and stops."""

    def __init__(self):
        self.signal: str | None = None
        """The signal's name (SIGINT, SIGTERM) once one came."""

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest):
    """While training, Ctrl-C and SIGTERM ask for a checkpoint and a clean stop instead of dying."""
    def handler(signum, _frame):
        stop.signal = signal.Signals(signum).name

    with handling((signal.SIGINT, signal.SIGTERM), handler):
        yield


def trim_metrics(path: Path, step: int) -> list[dict]:
    """On resume: the metrics up to the checkpoint's step (later lines were never kept)."""
    if not path.is_file():
        return []
    kept = [e for e in map(json.loads, path.read_text().splitlines()) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return kept
