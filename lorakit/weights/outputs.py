"""Writing an output folder (an adapter, a model, an export) without ever destroying what is not ours.

    adapters/<name>/                 replaced only when it is provably lorakit's own output (its manifest
                                     says lorakit wrote it, and it holds nothing but what that manifest
                                     lists), only with --overwrite, and never when it contains the
                                     working folder, the recipe, the data or any other input of the run
    adapters/.<name>.partial-<pid>/  being written; renamed into place when complete
    adapters/.<name>.old-<pid>/      the replaced folder, between the two renames of a publish
    adapters/.<name>.run.trash-<pid>/  a finished run's checkpoints, on their way out

A folder left by a process that died (killed mid-write) is removed by the next write beside it, or by
`lorakit adapters clean`; `lorakit adapters list` shows what is there meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import LorakitError
from ..recipe import output_path  # noqa: F401  (where an output setting points)
from ..system.processes import dead_writers
from .manifest import Manifest

# What lorakit wrote into an output before manifests listed their files (lorakit 0.1.0).
_KNOWN = re.compile(r"adapter_config\.json|adapter_model\.safetensors|README\.md|tokenizer\.json|tokenizer_config\.json"
                    r"|special_tokens_map\.json|chat_template\.jinja|vocab\.json|merges\.txt|added_tokens\.json"
                    r"|recipe\.yaml|manifest\.json|metrics\.jsonl|loss\.png|parent|config\.json"
                    r"|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|run\.trash)-(?P<pid>\d+)$")


def describe_size(count: float) -> str:
    """Bytes for a person: 512 B, 3.4 KiB, 12.0 MiB, 1.50 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}" if unit == "GiB" else f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


def own_manifest(folder: Path) -> Manifest | None:
    """The manifest of a folder lorakit wrote, or None when the folder is not provably lorakit's."""
    try:
        return Manifest.read(folder)
    except LorakitError:
        return None


def _foreign(folder: Path, manifest: Manifest) -> list[str]:
    """Entries of `folder` that its manifest does not account for (schema 0 listed none: the names
    lorakit 0.1.0 wrote stand in)."""
    known = (lambda n: n in manifest.files) if manifest.files else (lambda n: _KNOWN.fullmatch(n) is not None)
    return sorted(p.name for p in folder.iterdir() if not known(p.name))


def check_output(out: Path, *, overwrite: bool, inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse, before any work, an output that would destroy something that is not lorakit's own.

    `inputs` are (what, path) pairs the run reads (recipe, data, parent, model): the output must not
    contain any of them, nor the working folder."""
    here = out.resolve()
    for what, path in [("the working folder", Path.cwd()), *inputs]:
        if path is None or not Path(path).expanduser().exists():  # a hub id, or nothing there to lose
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved == here or here in resolved.parents:
            raise LorakitError(f"{out}: this output folder contains {what} ({path}); lorakit replaces its output "
                               f"folder whole, so choose an output that holds none of your files")
    if not out.exists():
        return
    if not out.is_dir():
        raise LorakitError(f"{out}: exists and is not a folder; choose another output")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    manifest = own_manifest(out)
    if manifest is None:
        raise LorakitError(f"{out}: exists and is not a lorakit output (it holds {_names(entries)}); choose another "
                           f"output or remove it")
    foreign = _foreign(out, manifest)
    if foreign:
        raise LorakitError(f"{out}: holds files lorakit did not write ({_names(foreign)}); move them out or choose "
                           f"another output")
    if not overwrite:
        raise LorakitError(f"{out} already holds {manifest.describe()}; pass --overwrite to replace it, or "
                           f"choose another output")


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@contextlib.contextmanager
def staging(out: Path, shown: Path | None = None, *, full_disk_is_final: bool = True) -> Iterator[Path]:
    """A fresh folder beside `out` (same file system, so the final rename is atomic), removed unless
    it was published. Leftovers of dead writers beside `out` are swept first. A full disk while it is
    written is one line naming `shown` (the output the user asked for, where `out` is a step of it), unless
    the caller has more to say (training: what it kept to resume from)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)
    folder = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not full_disk_is_final:
            raise
        raise LorakitError(f"writing {shown or out} failed ({exc.strerror}); nothing was kept (the disk filled after "
                           f"{describe_size(folder_size(folder))} of it): free space there and run the command "
                           f"again") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staging_folder: Path, out: Path, *, overwrite: bool) -> Path:
    """Move a completed staging folder into place; an older output is replaced only as check_output allows."""
    check_output(out, overwrite=overwrite)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging_folder.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def remove_folder(folder: Path) -> None:
    """Remove a folder as one step: renamed out of the way first, so a kill midway leaves either the
    whole folder or a leftover that the next write sweeps, never a half-deleted folder that looks real."""
    if not folder.exists():
        return
    trash = folder.parent / f"{folder.name}.trash-{os.getpid()}"
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def leftovers(folder: Path) -> list[Path]:
    """Partial writes, replaced outputs and checkpoint trash under `folder` whose writer has died."""
    return dead_writers(folder, LEFTOVER)


def sweep(folder: Path) -> list[Path]:
    """Remove the leftovers of dead writers under `folder`; returns what was removed."""
    removed = leftovers(folder)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Fail before the work, with the figure, when `needed` bytes will not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LorakitError(f"{what} needs about {describe_size(needed)} in {folder}, but only "
                           f"{describe_size(free)} is free")
