"""Raw records -> token ids and labels, a batch at a time: the step that preparation runs on every
core (`datasets.map(num_proc=...)`), and that streaming and preview run in-process.

A bad record does not raise inside a worker: its message goes into the `error` column, and the
preparation names the first bad record in file order, whichever worker found it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LorakitError
from .blocks import IGNORE
from .chat import end_of_turn, to_messages, tokenize_conversation, with_system
from .files import Record, parse
from .specials import encode_text, holds_markers
from .text import document_text


@dataclass(frozen=True)
class TokenizeSettings:
    stage: str
    max_length: int
    system_prompt: str | None = None
    field: str | None = None
    """The record field holding the text (CPT) or the messages (SFT), when it is not `text` / `messages`."""


def tokenize_batch(batch: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """Columns: input_ids, labels (empty for CPT: every token is trained), length, error, unread (fields
    lorakit did not read), eot (the end-of-turn token is trained; SFT), literal (the record spells a special
    token, which is tokenized as text), continues (CPT: a piece of a long document that the next row goes on)."""
    out = {"input_ids": [], "labels": [], "length": [], "error": [], "unread": [], "eot": [], "literal": [],
           "continues": []}
    if settings.stage == "cpt":
        _documents(batch, tokenizer, settings, out)
        return out
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    for where, raw in zip(batch["where"], batch["raw"]):
        try:
            messages, unread = to_messages(_record(where, raw, settings.field, "messages"))
            messages = with_system(messages, settings.system_prompt)
            example = tokenize_conversation(tokenizer, messages, settings.max_length, where)
            if all(label == IGNORE for label in example.labels):
                raise LorakitError(f"{where}: no assistant token is left after truncation to data.max_length="
                                   f"{settings.max_length}; raise max_length or shorten the conversation")
        except LorakitError as exc:
            _failed(out, str(exc))
            continue
        literal = holds_markers(tokenizer, [m["content"] for m in messages])
        _add(out, example.input_ids, example.labels, "", unread, eot_id in example.labels, literal)
    return out


def _documents(batch: dict, tokenizer, settings: TokenizeSettings, out: dict) -> None:
    texts, errors = [], []
    continues = batch.get("continues") or [False] * len(batch["raw"])
    for where, raw in zip(batch["where"], batch["raw"]):
        try:
            texts.append(document_text(_record(where, raw, settings.field, "text")))
            errors.append("")
        except LorakitError as exc:
            texts.append("")
            errors.append(str(exc))
    spelled = [holds_markers(tokenizer, [text]) for text in texts]
    encoded = encode_text(tokenizer, texts, spelled=any(spelled))
    eos = tokenizer.eos_token_id
    for text, ids, error, more, literal in zip(texts, encoded, errors, continues, spelled):
        if more:  # a piece of a long document: the next piece goes on where this one stops
            kept = ids
        else:
            kept = ids + [eos] if text.strip() else []  # an empty document is dropped
        _add(out, kept, [], error, [], True, literal, bool(more))


def _record(where: str, raw: str, field: str | None, standard: str) -> Record:
    value = parse(raw, where)
    if field is not None and isinstance(value, dict):
        if field not in value:
            raise LorakitError(f"{where}: no `{field}` field (data.field)")
        value = {standard: value[field]}
    return Record(where, value)


def _add(out: dict, ids: list[int], labels: list[int], error: str, unread: list[str], eot: bool,
         literal: bool = False, continues: bool = False) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))
    out["error"].append(error)
    out["unread"].append(unread)
    out["eot"].append(eot)
    out["literal"].append(literal)
    out["continues"].append(continues)


def _failed(out: dict, error: str) -> None:
    _add(out, [], [], error, [], False)


BATCH = 256
"""Records tokenized at once (datasets.map's batch, and the streaming path's)."""
PIECE_CHARS = 1 << 16
"""CPT documents longer than this many characters are tokenized in pieces (cut at a space), so that
what one record holds never sets how much memory tokenizing takes: one 200 MB record once took 23 GB."""


def pieces(where: str, raw: str, field: str | None) -> list[str] | None:
    """A long CPT record's text in pieces of at most PIECE_CHARS (None: short enough as it is). A cut
    is made before a space that follows a non-space, where the tokenizer's pre-split would cut anyway."""
    if len(raw) <= PIECE_CHARS:
        return None
    text = document_text(_record(where, raw, field, "text"))
    found, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = text.rfind(" ", end - PIECE_CHARS // 8, end)
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        cut = cut if cut > start else end  # no space nearby (Chinese, say): cut where the piece is full
        found.append(text[start:cut])
        start = cut
    found.append(text[start:])
    return found
