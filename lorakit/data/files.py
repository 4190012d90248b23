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
    """The files a `data.path` stands for: the file itself, or the matching files under a folder. A
    relative path is read from the working folder (the message says where it looked)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LorakitError(f"{path}: data path not found (looked at {path.resolve()})")
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise LorakitError(f"{path}: expected a {' / '.join(suffixes)} file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise LorakitError(f"{path}: folder holds no {' / '.join(suffixes)} files")
    return files


def read_text(path: Path) -> str:
    """A file's text: UTF-8, a leading byte-order mark dropped (editors on Windows write one), and no
    NUL bytes (a binary file, or a UTF-16 one, would otherwise be trained on as text)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LorakitError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise LorakitError(f"{path}: holds NUL bytes (the first at character {nul}): a binary or UTF-16 file, "
                           f"not UTF-8 text")
    return text


def check_unicode(text: str, where: str, field: str) -> None:
    """A JSON string may hold a lone surrogate ("\\ud800", common in scraped text) that is no character at
    all: the tokenizer would fail on it far from the record. Named here instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LorakitError(f"{where}: field `{field}` holds an unpaired surrogate ({text[exc.start]!r} at "
                           f"character {exc.start}), which is not valid Unicode; clean or drop that text") from None


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
    # split on newlines only: str.splitlines() also splits at U+2028 and other separators that JSON
    # strings may hold as they are, cutting a valid record in two
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        yield Record(f"{path} line {number}", _parse(line, path, number))


def _json(path: Path) -> Iterator[Record]:
    value = _parse(read_text(path), path)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise LorakitError(f"{path}: expected a JSON list of records")
    for number, item in enumerate(value, start=1):
        yield Record(f"{path} record {number}", item)


def _parse(text: str, path: Path, line: int | None = None):
    """JSON, or one line naming the file and line of what is wrong with it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{path} line {line or exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        where = f"{path} line {line}" if line else str(path)
        raise LorakitError(f"{where}: JSON nested too deeply to be a training record") from None


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
