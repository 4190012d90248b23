"""What `data.path` names, and its records read one at a time, each tagged with where it came from.

`data.path` is a file, a folder (every file under it is read, or named in a note), a glob pattern
(`corpus/*.jsonl.gz`), a folder written by `datasets.save_to_disk`, or a hub dataset (`hf:org/name`).
Files are .txt (one document each), .json (a list of records), .jsonl and .parquet, each also
compressed as .gz or .zst. Records are read lazily, so a corpus larger than memory streams through.

Hand-written rather than `datasets.load_dataset("json")` because that loader reports a bad line as an
arrow parsing error without the file and line, and a user with 50,000 records needs both.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorakitError, first_line

RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt",) + RECORD_SUFFIXES
COMPRESSIONS = (".gz", ".zst")
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Record:
    where: str
    """File and record number (or line), for messages: "data/chat.jsonl line 7"."""
    value: Any


@dataclass(frozen=True)
class Source:
    """The data a `data.path` stands for."""

    label: str
    """data.path as the user wrote it."""
    files: tuple[Path, ...] = ()
    """The data files to read, in a stable order."""
    skipped: tuple[Path, ...] = ()
    """Files in a data folder that lorakit does not read (named in a note, never dropped in silence)."""
    dataset: str | None = None
    """A datasets.save_to_disk folder, or a hub id, read through `datasets` instead of files."""
    split: str = "train"
    notes: list[str] = field(default_factory=list)


def kind_of(path: Path) -> str | None:
    """".jsonl" for data.jsonl and data.jsonl.gz; None for a file lorakit does not read."""
    name = path.name.lower()
    for compression in ("",) + COMPRESSIONS:
        for suffix in TEXT_SUFFIXES:
            if name.endswith(suffix + compression) and not (compression and suffix == ".parquet"):
                return suffix
    return None


def resolve(path: str | Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES, split: str = "train") -> Source:
    """The files (or dataset) a `data.path` stands for. A relative path is read from the working folder
    (the message says where it looked)."""
    label = str(path)
    if label.startswith(HUB_PREFIX):
        return Source(label, dataset=label, split=split)
    if any(c in label for c in "*?["):
        matches = _glob(Path(label).expanduser())
        files = [p for p in matches if kind_of(p) in suffixes]
        if not files:
            raise LorakitError(f"{label}: the pattern matches no {' / '.join(suffixes)} file")
        return _source(label, files, [p for p in matches if kind_of(p) not in suffixes], suffixes)
    path = Path(path).expanduser()
    if not path.exists():
        raise LorakitError(f"{path}: data path not found (looked at {path.resolve()})")
    if not path.is_file() and not path.is_dir():
        raise LorakitError(f"{path}: neither a regular file nor a folder (a pipe, socket or device); data.path "
                           f"names a data file or a folder of them")
    if path.is_file():
        if kind_of(path) not in suffixes:
            raise LorakitError(f"{path}: expected a {' / '.join(suffixes)} file (also .gz or .zst)")
        return Source(label, files=(path,))
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return Source(label, dataset=str(path), split=split)
    found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    files = [p for p in found if kind_of(p) in suffixes]
    if not files:
        raise LorakitError(f"{path}: folder holds no {' / '.join(suffixes)} files")
    return _source(label, files, [p for p in found if kind_of(p) not in suffixes], suffixes)


def _glob(pattern: Path) -> list[Path]:
    """Files a pattern matches. pathlib's `**` does not descend into symbolic links to folders, so a link
    loop cannot make it walk for ever (glob.glob(recursive=True) does follow them)."""
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = Path(*parts[:first]) if first else Path(".")
    rest = str(Path(*parts[first:]))
    return sorted(p for p in base.glob(rest) if not _hidden(p.relative_to(base)) and p.is_file())


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _source(label: str, files: list[Path], skipped: list[Path], suffixes: tuple[str, ...]) -> Source:
    notes = []
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        notes.append(f"note: {len(skipped)} file(s) in {label} are not read ({shown}): lorakit reads "
                     f"{' / '.join(suffixes)} files, also as .gz or .zst")
    return Source(label, tuple(files), tuple(skipped), notes=notes)


def data_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a `data.path` stands for (a dataset folder or a hub id has none: use records())."""
    source = resolve(path, suffixes)
    if source.dataset:
        raise LorakitError(f"{path}: a datasets folder or hub dataset, not data files")
    return list(source.files)


def open_binary(path: Path):
    """The file's bytes, decompressed as they are read."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise LorakitError(f"{path}: reading .zst files needs the zstandard package: pip install zstandard") from None
        return io.BufferedReader(_Zstd(path, zstandard), buffer_size=1 << 20)
    return open(path, "rb")


class _Zstd(io.RawIOBase):
    """A .zst file's bytes, frame after frame. Hand-written because zstandard's stream_reader returns a
    truncated file's data as a clean (often empty) end: a cut-off download read as "no documents". Here a
    stream that ends inside a frame, or bytes that are not zstd, raise an error naming the file."""

    def __init__(self, path: Path, zstandard):
        self._file, self._zstd, self._path = open(path, "rb"), zstandard, path
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if not self._frame.eof:
                    raise EOFError("the .zst data ends before its frame does (truncated or empty file)")
                return 0
            self._decompress(chunk)
        count = min(len(buffer), len(self._out))
        buffer[:count], self._out = self._out[:count], self._out[count:]
        return count

    def _decompress(self, chunk: bytes) -> None:
        try:
            while chunk:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._out += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        except self._zstd.ZstdError as exc:
            raise OSError(f"not valid zstd data ({exc})") from None

    def close(self) -> None:
        self._file.close()
        super().close()


def read_text(path: Path) -> str:
    """A file's text: UTF-8, a leading byte-order mark dropped (editors on Windows write one), and no
    NUL bytes (a binary file, or a UTF-16 one, would otherwise be trained on as text)."""
    try:
        with open_binary(path) as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise LorakitError(f"{path}: cannot read ({first_line(exc)})") from None
    try:
        text = data.decode("utf-8-sig")
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
    """Records of a .json list, .jsonl or .parquet file (compressed or not), one at a time."""
    kind = kind_of(path)
    if kind == ".jsonl":
        yield from _jsonl(path)
    elif kind == ".json":
        yield from _json(path)
    elif kind == ".parquet":
        yield from _parquet(path)
    else:
        raise LorakitError(f"{path}: unsupported data file type")


def raw_records(path: Path) -> Iterator[tuple[str, str]]:
    """(where, JSON text) of each record, not parsed yet: what the parallel preparation hands to its
    workers, so that parsing, like tokenizing, runs on every core. (.txt files are one document each.)"""
    kind = kind_of(path)
    if kind == ".jsonl":
        yield from ((where, line) for where, line in _jsonl_lines(path))
    elif kind == ".txt":
        yield str(path), json.dumps({"text": read_text(path)}, ensure_ascii=False)
    else:
        yield from ((r.where, json.dumps(r.value, ensure_ascii=False)) for r in read_records(path))


def _jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    # bytes split on b"\n" only: str.splitlines() also splits at U+2028 and other separators that JSON
    # strings may hold as they are, cutting a valid record in two
    try:
        with open_binary(path) as handle:
            for number, line in enumerate(handle, start=1):
                text = _decode(line, path, number)
                if text.strip():
                    yield f"{path} line {number}", text
    except (OSError, EOFError) as exc:
        raise LorakitError(f"{path}: cannot read ({first_line(exc)})") from None


def _decode(line: bytes, path: Path, number: int) -> str:
    try:
        text = line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise LorakitError(f"{path} line {number}: not UTF-8 text (bad byte at column {exc.start})") from None
    if "\x00" in text:
        raise LorakitError(f"{path} line {number}: holds NUL bytes: a binary or UTF-16 file, not UTF-8 text")
    return text


def _jsonl(path: Path) -> Iterator[Record]:
    for where, line in _jsonl_lines(path):
        yield Record(where, parse(line, where))


def _json(path: Path) -> Iterator[Record]:
    value = parse(read_text(path), str(path))
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise LorakitError(f"{path}: expected a JSON list of records")
    for number, item in enumerate(value, start=1):
        yield Record(f"{path} record {number}", item)


def parse(text: str, where: str):
    """JSON, or one line naming the file and line of what is wrong with it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = where if " line " in where else f"{where} line {exc.lineno}"
        raise LorakitError(f"{at}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise LorakitError(f"{where}: JSON nested too deeply to be a training record") from None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # comes with datasets

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield Record(f"{path} record {number}", row)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        if isinstance(exc, LorakitError):
            raise
        raise LorakitError(f"{path}: not a readable parquet file ({first_line(exc)})") from None


def fingerprint_files(files: list[Path] | tuple[Path, ...]) -> str:
    """A hash of the training data (names and bytes), recorded in every adapter's manifest and part of
    the data cache's key. xxh3 rather than sha256: a gigabyte hashes in a fraction of a second.

    Each name and each file's bytes are preceded by their lengths, so that no two different sets of files
    hash the same stream (a.txt "ab" + b.txt "c" against one a.txt "abb.txtc" would otherwise collide)."""
    import xxhash

    digest = xxhash.xxh3_128()
    for file in files:
        name = file.name.encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        with open(file, "rb") as handle:
            digest.update(os.fstat(handle.fileno()).st_size.to_bytes(8, "little"))
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]
