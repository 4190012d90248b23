"""Prepared data on disk: tokenized and packed once, memory-mapped by every run and every process.

    <data.cache_dir>/                    default: $XDG_CACHE_HOME/lorakit/data (~/.cache/lorakit/data)
      <key>/                             one entry: train.arrow, eval.arrow (if any), meta.json
      .<key>.partial-<pid>@<host>/       an entry being prepared; renamed into place when complete, so a
                                         killed preparation leaves nothing a later run would trust
      <key>.lock                         held while one process prepares (its PID@HOST inside); the others say
                                         who they wait for, wait, then read

In a run over several machines, each machine's local rank 0 prepares the entry on its own disk (or, where the
cache folder is shared, one of them does while the others wait for the lock) and the machine's other ranks wait
for it: no rank ever waits for a file another machine writes.

meta.json is written last and records the size and checksum of every Arrow file: an entry that does not
match (a flipped bit, a truncated file, a missing meta.json) is named in one line and prepared again.

The key is a hash of everything that changes the rows: the data files' bytes, the tokenizer (its
whole definition) and chat template, the stage, max_length, packing, the system prompt, the eval
data and split, and lorakit's data format version. A changed file, tokenizer or setting is a new key
(a miss), never a stale hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorakitError, first_line
from ..log import is_main, say
from ..system import cache_home
from ..system.processes import HOST, dead_writers, writer

FORMAT = 2
"""The layout of prepared rows; raised whenever it changes, so older entries are never read.
2: meta.json carries each Arrow file's checksum (and the data fingerprint counts lengths)."""
META = "meta.json"
WAIT_S = 0.5
PARTIAL = re.compile(r"^\..+\.(partial|damaged)-(?P<pid>\d+)(?:@(?P<host>[\w.-]+))?$")


def default_dir() -> Path:
    return cache_home() / "data"


def cache_key(parts: dict) -> str:
    import xxhash

    return xxhash.xxh3_128(json.dumps({**parts, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that changes token ids: its whole definition (normalizer,
    pre-tokenizer, vocabulary, merges, added tokens), the chat template and the special tokens."""
    import xxhash

    digest = xxhash.xxh3_128()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps([tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token]).encode())
    return digest.hexdigest()[:16]


def checksum(path: Path) -> str:
    """xxh3 of a file's bytes: 2.5 s for a 1 GB corpus's 2.8 GiB of rows from this project's disk, 0.34 s from
    the page cache (bench/cache_check.py), against the minutes it took to tokenize."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def seal(folder: Path, meta: dict) -> None:
    """Write meta.json last, with the checksum and size of every Arrow file beside it."""
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "xxh3": checksum(p)} for p in sorted(folder.glob("*.arrow"))}
    write_meta(folder, meta)


def damage(folder: Path) -> str | None:
    """What is wrong with a complete-looking entry (None: it is whole). Every Arrow file must match the size
    and checksum recorded when it was written: a flipped bit would otherwise be trained on in silence."""
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as exc:
        return f"{META} unreadable ({first_line(exc)})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or "train.arrow" not in files:
        return f"{META} records no checksums"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded.get("bytes"):
            return f"{name} is {path.stat().st_size:,} bytes, {recorded.get('bytes'):,} were written"
        if checksum(path) != recorded.get("xxh3"):
            return f"{name} does not match its checksum"
    return None


def entry(root: Path, key: str) -> Path | None:
    """The complete entry for `key` (meta.json present: written last), or None. Not yet verified: see damage()."""
    folder = root / key
    return folder if (folder / META).is_file() else None


def discard(folder: Path, why: str) -> None:
    """Set a damaged or incomplete entry aside (one rename) and remove it, saying why."""
    say(f"data: the cache entry {folder} is damaged ({why}); preparing it again")
    trash = folder.parent / f".{folder.name}.damaged-{writer()}"
    with contextlib.suppress(FileNotFoundError):
        folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def open_root(root: Path) -> Path:
    """The cache folder, created if need be; a file or an unwritable folder there is one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise LorakitError(f"data.cache_dir {root}: cannot keep prepared data there ({exc.strerror or exc}); "
                           f"set data.cache_dir to a writable folder") from None
    return root


@contextlib.contextmanager
def preparing(root: Path, key: str) -> Iterator[Path | None]:
    """Hold the key's lock; yield a fresh partial folder to prepare into, or None when another process
    finished the entry meanwhile. The caller writes META last (seal); the folder is then renamed into place.

    The lock is a POSIX record lock (fcntl.lockf), not flock: flock's lock belongs to the open file,
    which the tokenizing workers forked by datasets share, so workers orphaned by a killed preparation
    held it for ever. A record lock belongs to this process alone and ends with it."""
    _sweep(root)
    with open(root / f"{key}.lock", "a+") as lock:
        _lock(lock, root / key)
        try:
            if entry(root, key) is not None:
                yield None
                return
            if (root / key).exists():  # a folder without meta.json: not ours to trust
                discard(root / key, f"no {META}")
            partial = root / f".{key}.partial-{writer()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            try:
                yield partial
                if (partial / META).is_file():
                    partial.rename(root / key)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def _lock(lock, target: Path) -> None:
    """Take the lock; while another process holds it, say who and for what, then wait."""
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        say(f"data: waiting for process {holder or '(unknown)'}{_command(holder)} to finish preparing {target} "
            f"(lock: {lock.name})")
        fcntl.lockf(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(writer())
    lock.flush()


def _command(pid: str) -> str:
    try:
        number, _, host = pid.partition("@")
        if host not in ("", HOST):
            return f" on {host}"
        words = Path(f"/proc/{int(number)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return ""
    return f" ({' '.join(w.decode(errors='replace') for w in words if w)[:120]})"


def wait_for(root: Path, key: str, timeout_s: float = 24 * 3600) -> Path:
    """The ranks of a distributed run other than their machine's local rank 0: wait for its entry instead of
    preparing it again (torchrun ends every rank if one fails)."""
    said, start = False, time.monotonic()
    while (found := entry(root, key)) is None or damage(found) is not None:
        if not said:
            print(f"rank {os.environ.get('RANK')}: waiting for this machine's local rank 0 to prepare the data",
                  flush=True)
            said = True
        if time.monotonic() - start > timeout_s:
            raise LorakitError(f"waited {timeout_s:.0f} s for local rank 0 to prepare the data in {root / key}")
        time.sleep(WAIT_S)
    return found


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text(encoding="utf-8"))


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _sweep(root: Path) -> None:
    """Partial entries of preparations that were killed (their process is gone)."""
    for path in dead_writers(root, PARTIAL):
        shutil.rmtree(path, ignore_errors=True)


def announce_hit(folder: Path, meta: dict) -> None:
    if is_main():
        say(f"data: read from the cache, tokenized once before ({meta['stats']['rows']:,} rows, prepared "
            f"{meta['created'][:16].replace('T', ' ')} in {meta['seconds']:.1f} s; {folder})")
