"""Prepared data on disk: tokenized and packed once, memory-mapped by every run and every process.

    <data.cache_dir>/                    default: $XDG_CACHE_HOME/lorakit/data (~/.cache/lorakit/data)
      <key>/                             one entry: train.arrow, eval.arrow (if any), meta.json
      .<key>.partial-<pid>/              an entry being prepared; renamed into place when complete, so a
                                         killed preparation leaves nothing a later run would trust
      <key>.lock                         held while one process prepares; the others wait, then read

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

from ..errors import LorakitError
from ..log import is_main, say
from ..system import cache_home
from ..system.processes import dead_writers

FORMAT = 1
"""The layout of prepared rows; raised whenever it changes, so older entries are never read."""
META = "meta.json"
WAIT_S = 0.5
PARTIAL = re.compile(r"^\..+\.partial-(?P<pid>\d+)$")


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


def entry(root: Path, key: str) -> Path | None:
    """The complete entry for `key`, or None."""
    folder = root / key
    return folder if (folder / META).is_file() else None


@contextlib.contextmanager
def preparing(root: Path, key: str) -> Iterator[Path | None]:
    """Hold the key's lock; yield a fresh partial folder to prepare into, or None when another process
    finished the entry meanwhile. The caller writes META last; the folder is then renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    with open(root / f"{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process preparing the same data: wait for it
        try:
            if entry(root, key) is not None:
                yield None
                return
            partial = root / f".{key}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            try:
                yield partial
                if (partial / META).is_file():
                    partial.rename(root / key)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def wait_for(root: Path, key: str, timeout_s: float = 24 * 3600) -> Path:
    """Ranks other than 0 of a distributed run: wait for rank 0's entry instead of preparing it again
    (torchrun ends every rank if rank 0 fails)."""
    said, start = False, time.monotonic()
    while (found := entry(root, key)) is None:
        if not said:
            print(f"rank {os.environ.get('RANK')}: waiting for rank 0 to prepare the data", flush=True)
            said = True
        if time.monotonic() - start > timeout_s:
            raise LorakitError(f"waited {timeout_s:.0f} s for rank 0 to prepare the data in {root / key}")
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
