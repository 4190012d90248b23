"""Rows made while training reads them (`data.streaming: true`: nothing prepared ahead, nothing cached), the
first examples as training sees them (`lorakit preview`), and small data tokenized in memory (`lorakit
eval`, the tests)."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import LorakitError
from ..log import say
from ..recipe import Recipe
from .blocks import Example, pack_examples, stream_blocks
from .chat import load_conversations, tokenize_conversations
from .files import Source
from .sources import Prepared, as_raw, dataset, plan, raw
from .template import style_for
from .text import load_documents, tokenize_documents
from .tokenize import BATCH, TokenizeSettings, tokenize_batch


def first_examples(recipe: Recipe, tokenizer, count: int) -> list[Example]:
    """The first `count` examples as training sees them, tokenized here and now (`lorakit preview`)."""
    parts, _, _ = plan(recipe, tokenizer)
    found = []
    for example in _stream_examples(parts[0].source, tokenizer, parts[0].settings):
        found.append(example)
        if len(found) == count:
            break
    return found


def streaming(recipe: Recipe, source: Source, eval_source: Source | None, tokenizer, settings: TokenizeSettings,
               data_hash: str) -> Prepared:
    """Rows made while training reads them: nothing is prepared ahead, nothing is cached."""
    from datasets import IterableDataset

    data = recipe.data
    rows = IterableDataset.from_generator(_stream_rows, gen_kwargs={
        "source": source, "tokenizer": tokenizer, "settings": settings, "packing": data.packing})
    eval_rows = None
    if eval_source is not None:
        eval_examples = list(_stream_examples(eval_source, tokenizer, settings))
        eval_rows = to_rows(settings.stage, eval_examples, data.max_length, data.packing)
    say(f"data: streaming {source.label} (tokenized while training reads it; nothing cached)")
    stats = {"examples": None, "rows": None, "tokens": None, "trained_tokens": None,
             "eval_rows": len(eval_rows) if eval_rows else 0}
    return Prepared(rows, data_hash, stats, settings.system_prompt, list(source.notes), eval_rows, None)


def _stream_examples(source: Source, tokenizer, settings: TokenizeSettings) -> Iterator[Example]:
    batch = {"where": [], "raw": [], "continues": [], "opens": []}
    records = raw(list(source.files), settings) if source.files else \
        (dict(zip(out, values)) for out in dataset(source).map(
            as_raw, batched=True, with_indices=True, fn_kwargs={"label": source.label}).iter(batch_size=BATCH)
         for values in zip(*out.values()))
    for record in records:
        for name in batch:
            batch[name].append(record[name])
        if len(batch["where"]) == BATCH:
            yield from _examples_of(batch, tokenizer, settings)
            batch = {"where": [], "raw": [], "continues": [], "opens": []}
    if batch["where"]:
        yield from _examples_of(batch, tokenizer, settings)


def _examples_of(batch: dict, tokenizer, settings: TokenizeSettings) -> Iterator[Example]:
    out = tokenize_batch(batch, tokenizer, settings)
    for where, ids, labels, error, more, side in zip(out["where"], out["input_ids"], out["labels"], out["error"],
                                                     out["continues"], out["side"]):
        if error:
            raise LorakitError(error)
        if ids:
            yield Example(ids, labels or ids, where, more, None if side < 0 else side)


def _stream_rows(source: Source, tokenizer, settings: TokenizeSettings, packing: bool) -> Iterator[dict]:
    examples = _stream_examples(source, tokenizer, settings)
    if settings.stage == "cpt":
        yield from stream_blocks(examples, settings.max_length, packing)
        return
    window: list[Example] = []  # SFT: first-fit within windows of examples, as a stream allows
    for example in examples:
        window.append(example)
        if len(window) == 1024:
            yield from pack_examples(window, settings.max_length, packing)
            window = []
    if window:
        yield from pack_examples(window, settings.max_length, packing)


# In memory, for small data: `lorakit eval`, preview and the tests.

def load_examples(stage: str, path, tokenizer, max_length: int, system_prompt: str | None, reasoning: str = "keep"):
    """Examples of a data path for a stage, the files read, and notes for the log."""
    if stage == "cpt":
        documents, files = load_documents(path)
        examples = tokenize_documents(documents, tokenizer)
        long = sum(len(e.input_ids) > max_length for e in examples)
        notes = [f"{long} of {len(examples)} documents are longer than max_length={max_length} "
                 f"and were split into blocks (not cut)"] if long else []
        return examples, files, notes
    conversations, files, notes = load_conversations(path)
    examples, cut = tokenize_conversations(conversations, tokenizer, max_length, system_prompt,
                                           style_for(tokenizer, reasoning))
    notes += [f"{cut} of {len(examples)} conversations were truncated to max_length={max_length} "
              f"before their last end-of-turn token"] if cut else []
    return examples, files, notes


def to_rows(stage: str, examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    if stage == "cpt":
        return list(stream_blocks(examples, max_length, packing))
    return pack_examples(examples, max_length, packing)
