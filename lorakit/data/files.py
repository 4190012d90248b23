"""Reading data files into records, each tagged with where it came from.

Hand-written rather than `datasets.load_dataset("json")` because that loader reports a bad line as an
arrow parsing error without the file and line, and a user with 50,000 records needs both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import LorakitError

RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Record:
    where: str
    """File and record number (or line), for messages: "data/chat.jsonl line 7"."""
    value: Any


def data_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a `data.path` stands for: the file itself, or the matching files under a folder."""
    path = Path(path)
    if not path.exists():
        raise LorakitError(f"{path}: data path not found")
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise LorakitError(f"{path}: expected a {' / '.join(suffixes)} file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise LorakitError(f"{path}: folder holds no {' / '.join(suffixes)} files")
    return files


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LorakitError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def read_records(path: Path) -> Iterator[Record]:
    """Records of a .json list, .jsonl or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise LorakitError(f"{path}: unsupported data file type {suffix}")


def _jsonl(path: Path) -> Iterator[Record]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        yield Record(f"{path} line {number}", value)


def _json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise LorakitError(f"{path}: expected a JSON list of records")
    for number, item in enumerate(value, start=1):
        yield Record(f"{path} record {number}", item)


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # comes with datasets

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise LorakitError(f"{path}: not a readable parquet file ({exc})") from None
    for number, row in enumerate(rows, start=1):
        yield Record(f"{path} record {number}", row)


def fingerprint_files(files: list[Path]) -> str:
    """A hash of the training data (names and bytes), recorded in every adapter's manifest."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
