"""Continued pre-training data: raw text -> documents -> tokens (each ending in EOS) -> blocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LorakitError
from .blocks import Example
from .files import (
    TEXT_SUFFIXES,
    Record,
    check_unicode,
    data_files,
    kind_of,
    read_records,
    read_text,
)
from .specials import encode_text


@dataclass(frozen=True)
class Document:
    where: str
    text: str


def load_documents(path: str | Path) -> tuple[list[Document], list[Path]]:
    """Documents from a .txt file, a folder of .txt files, or json/jsonl/parquet `{"text": ...}` records."""
    files = data_files(path, TEXT_SUFFIXES)
    documents = []
    for file in files:
        if kind_of(file) == ".txt":
            documents.append(Document(str(file), read_text(file)))
        else:
            documents.extend(Document(record.where, document_text(record)) for record in read_records(file))
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise LorakitError(f"{path}: no non-empty documents found")
    return documents, files


def document_text(record: Record) -> str:
    """The text of a CPT record, checked."""
    if not isinstance(record.value, dict) or "text" not in record.value:
        raise LorakitError(f"{record.where}: no `text` field (CPT records look like {{\"text\": \"...\"}})")
    text = record.value["text"]
    if not isinstance(text, str):
        raise LorakitError(f"{record.where}: field `text` must be a string, got {type(text).__name__}")
    check_unicode(text, record.where, "text")
    return text


def tokenize_documents(documents: list[Document], tokenizer) -> list[Example]:
    """Each document's tokens (led by BOS where the tokenizer leads texts with it) followed by EOS; every
    token is trained."""
    from .template import with_bos

    eos = tokenizer.eos_token_id
    encoded = [with_bos(tokenizer, ids) + [eos] for ids in encode_text(tokenizer, [d.text for d in documents])]
    return [Example(ids, ids, d.where) for ids, d in zip(encoded, documents)]


def save_documents_json(folder: str | Path, out: str | Path, overwrite: bool = False) -> int:
    """`lorakit data text`: a folder of .txt files as a JSON list of {"text", "source"} records, written
    whole or not at all, and never over an existing file unless asked."""
    import json
    import os

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LorakitError(f"{out}: exists; pass --overwrite to replace it, or choose another file")
    files = data_files(folder, (".txt",))
    records = [{"text": read_text(f), "source": str(f.relative_to(folder)) if Path(folder).is_dir() else f.name}
               for f in files]
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return len(records)
