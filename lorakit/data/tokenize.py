"""Raw records -> token ids and labels, a batch at a time: the step that preparation runs on every
core (`datasets.map(num_proc=...)`), and that streaming and preview run in-process.

A bad record does not raise inside a worker: its message goes into the `error` column, and the
preparation names the first bad record in file order, whichever worker found it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LorakitError
from ..stages import stage as stage_of
from .blocks import IGNORE
from .chat import to_messages, tokenize_conversation
from .files import Record, parse
from .pairs import to_preference, tokenize_answers, with_kl
from .specials import encode_text, holds_markers
from .template import end_of_turn, style_for, with_bos, with_system
from .text import document_text
from .tools import renders_tools, written_texts


@dataclass(frozen=True)
class TokenizeSettings:
    stage: str
    max_length: int
    system_prompt: str | None = None
    field: str | None = None
    """The record field holding the text (CPT) or the messages (SFT), when it is not `text` / `messages`."""
    reasoning: str = "keep"
    """data.reasoning: what conversations keep of the template's reasoning block."""


def tokenize_batch(batch: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """Columns: where and file (of the record), input_ids, labels (empty for CPT: every token is trained),
    length, error, unread (fields lorakit did not read), eot (the end-of-turn token is trained; SFT), literal
    (the record spells a special token, which is tokenized as text), continues (CPT: a piece of a long
    document that the next row goes on with), side (preference stages: each answer's, stages.CHOSEN...). A
    conversation may make more than one row (template.rendered_examples), the first carrying its notes; a
    preference record makes two (chosen and rejected, or KTO's answer and its KL sequence)."""
    out = {"where": [], "file": [], "input_ids": [], "labels": [], "length": [], "error": [], "unread": [],
           "eot": [], "literal": [], "continues": [], "side": []}
    files = batch.get("file") or [""] * len(batch["where"])
    kind = stage_of(settings.stage).data
    if kind == "text":
        _documents(batch, files, tokenizer, settings, out)
        return out
    style = style_for(tokenizer, settings.reasoning)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, style))
    if kind != "chat":
        _preferences(batch, files, tokenizer, settings, style, eot_id, out)
        return out
    for where, file, raw in zip(batch["where"], files, batch["raw"]):
        try:
            messages, tools, unread = to_messages(_record(where, raw, settings.field, "messages"))
            if style.block is None and any("reasoning_content" in m for m in messages):
                unread = [*unread, "messages[].reasoning_content"]  # the template writes no reasoning
            if tools and not renders_tools(tokenizer):
                unread = [*unread, "tools"]  # nor tools (a call in the record is refused: template._calls_turn)
            messages = with_system(messages, settings.system_prompt)
            examples = tokenize_conversation(tokenizer, messages, settings.max_length, where, style, tools)
            if all(label == IGNORE for example in examples for label in example.labels):
                raise LorakitError(f"{where}: no assistant token is left after truncation to data.max_length="
                                   f"{settings.max_length}; raise max_length or shorten the conversation")
        except LorakitError as exc:
            _failed(out, where, file, str(exc))
            continue
        literal = holds_markers(tokenizer, written_texts(messages))
        for index, example in enumerate(examples):
            _add(out, where, file, example.input_ids, example.labels, "", [] if index else unread,
                 eot_id in example.labels, literal)
    return out


def _preferences(batch: dict, files: list[str], tokenizer, settings: TokenizeSettings, style, eot_id: int,
                 out: dict) -> None:
    """Two examples per record (data/pairs.py); a bad record makes two error rows, so records stay in twos."""
    kind, read = stage_of(settings.stage).data, []
    for where, file, raw in zip(batch["where"], files, batch["raw"]):
        try:
            prompt, answers, unread = to_preference(_record(where, raw, None, "prompt"), kind)
            read.append((where, file, prompt, answers, unread))
        except LorakitError as exc:
            _failed(out, where, file, str(exc), side=0)
            _failed(out, where, file, str(exc), side=0)
    units = with_kl([(p, a) for _, _, p, a, _ in read]) if kind == "unpaired" else [a for _, _, _, a, _ in read]
    for (where, file, prompt, _, unread), answers in zip(read, units):
        try:
            examples = tokenize_answers(tokenizer, prompt, answers, settings.system_prompt, settings.max_length,
                                        where, style)
        except LorakitError as exc:
            _failed(out, where, file, str(exc), side=0)
            _failed(out, where, file, str(exc), side=0)
            continue
        literal = holds_markers(tokenizer, [m["content"] for m in prompt] + [a["content"] for _, a in answers])
        for index, example in enumerate(examples):
            _add(out, where, file, example.input_ids, example.labels, "", [] if index else unread,
                 eot_id in example.labels, literal, side=example.side)


def _documents(batch: dict, files: list[str], tokenizer, settings: TokenizeSettings, out: dict) -> None:
    """Each document's tokens, led by BOS where the tokenizer leads every text with it (never twice: text
    that spells it is text) and closed by EOS."""
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
    eos, first = tokenizer.eos_token_id, batch.get("opens") or [True] * len(texts)
    for where, file, text, ids, error, more, literal, opens in zip(batch["where"], files, texts, encoded, errors,
                                                                   continues, spelled, first):
        if opens and text.strip():  # the first piece of a document
            ids = with_bos(tokenizer, ids)
        if more:  # a piece of a long document: the next piece goes on where this one stops
            kept = ids
        else:
            kept = ids + [eos] if text.strip() else []  # an empty document is dropped
        _add(out, where, file, kept, [], error, [], True, literal, bool(more))


def _record(where: str, raw: str, field: str | None, standard: str) -> Record:
    value = parse(raw, where)
    if field is not None and isinstance(value, dict):
        if field not in value:
            raise LorakitError(f"{where}: no `{field}` field (data.field)")
        value = {standard: value[field]}
    return Record(where, value)


def _add(out: dict, where: str, file: str, ids: list[int], labels: list[int], error: str, unread: list[str],
         eot: bool, literal: bool = False, continues: bool = False, side: int = -1) -> None:
    out["where"].append(where)
    out["file"].append(file)
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))
    out["error"].append(error)
    out["unread"].append(unread)
    out["eot"].append(eot)
    out["literal"].append(literal)
    out["continues"].append(continues)
    out["side"].append(side)


def _failed(out: dict, where: str, file: str, error: str, side: int = -1) -> None:
    _add(out, where, file, [], [], error, [], False, side=side)


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
