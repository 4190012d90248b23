"""A recipe's data, from files to training (and evaluation) rows on disk, with the facts the log and the
manifest report.

    files -> records (Arrow, written as read) -> token ids and labels (datasets.map, every core)
          -> checks (the first bad record named) -> packed rows (Arrow, written as packed)
          -> the cache entry (data/cache.py), memory-mapped by the Trainer

Memory stays flat in the corpus size: records and rows are written to disk as they are made, and
training reads rows from the memory-mapped file. A second run on the same data reads the entry
without tokenizing again; under torchrun, each machine's local rank 0 prepares it and the other ranks wait and read it.
`data.streaming: true` skips the cache: rows are made on the fly while training reads them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorakitError
from ..log import is_local_main, is_main, say
from ..recipe import Recipe
from ..stages import stage as stage_of
from ..system.processes import children_die_with_me
from . import cache
from .blocks import IGNORE, Example, first_fit, pair_rows, row, stream_blocks, unit_row
from .files import Source
from .mix import describe, mix, units
from .sources import (
    Part,
    Prepared,
    as_raw,
    dataset,
    fingerprint,
    fingerprint_parts,
    plan,
    raw,
)
from .specials import literal_note
from .stream import first_examples, load_examples, streaming, to_rows  # noqa: F401  (this module's API too)
from .template import end_of_turn, style_for
from .tokenize import BATCH, TokenizeSettings, tokenize_batch

WRITE_ROWS = 256  # rows buffered before they are written (a 1024-token row is 12 KB)


def prepare(recipe: Recipe, tokenizer) -> Prepared:
    """Load, check, tokenize and pack the recipe's data (or read it from the cache); raises LorakitError
    naming the first bad record."""
    data, stage = recipe.data, recipe.stage
    parts, eval_source, settings = plan(recipe, tokenizer)
    data_hash = fingerprint_parts(parts)
    if data.streaming:  # one source (the recipe refuses a list)
        return streaming(recipe, parts[0].source, eval_source, tokenizer, parts[0].settings, data_hash)
    key = cache.cache_key({"data": data_hash, "eval": fingerprint(eval_source) if eval_source else None,
                           "eval_split": data.eval_split, "seed": recipe.train.seed if data.eval_split or
                           _mixes(parts) else None, "tokenizer": cache.tokenizer_fingerprint(tokenizer),
                           "stage": stage, "max_length": data.max_length, "packing": data.packing,
                           "system_prompt": settings.system_prompt, "field": data.field,
                           "reasoning": data.reasoning if stage_of(stage).chat else None})
    root = (Path(data.cache_dir).expanduser() if data.cache_dir else cache.default_dir()).resolve()
    folder = _entry(root, key, lambda partial: _build(partial, recipe, parts, eval_source, tokenizer, settings))
    return _load(folder, data_hash, settings.system_prompt)


def _entry(root: Path, key: str, build) -> Path:
    """The cache entry for `key`: found (and whole), waited for (ranks other than their machine's first), or built
    now. Each machine's local rank 0 prepares (or repairs) it on that machine's disk, so a run over machines
    without a shared filesystem never waits for a folder another machine writes; wait_for takes only a whole entry."""
    if not is_local_main():
        return cache.wait_for(root, key)
    found = cache.entry(root, key)
    if found is not None:
        why = cache.damage(found)
        if why is None:
            cache.announce_hit(found, cache.read_meta(found))
            return found
        cache.discard(found, why)
    with cache.preparing(cache.open_root(root), key) as partial:
        if partial is None:  # another process prepared it while this one waited for the lock
            found = cache.entry(root, key)
            cache.announce_hit(found, cache.read_meta(found))
            return found
        with _one_line(root):
            build(partial)
    return root / key


@contextlib.contextmanager
def _one_line(root: Path):
    """What goes wrong while preparing, as one line: a bad record raised inside datasets' generator or
    workers (which wrap it in their own error types), a full or read-only disk."""
    try:
        yield
    except LorakitError:
        raise
    except Exception as exc:  # noqa: BLE001  (datasets wraps whatever its generator or workers raised)
        cause = next((e for e in _chain(exc) if isinstance(e, LorakitError)), None)
        if cause is not None:
            raise LorakitError(str(cause)) from None
        os_error = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno), None)
        if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise LorakitError(f"preparing the data in {root}: {os_error.strerror}; nothing was kept (free space "
                               f"there, or set data.cache_dir)") from None
        raise


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _load(folder: Path, data_hash: str, system_prompt: str | None) -> Prepared:
    from datasets import Dataset

    meta = cache.read_meta(folder)
    rows = Dataset.from_file(str(folder / "train.arrow"))
    eval_rows = Dataset.from_file(str(folder / "eval.arrow")) if (folder / "eval.arrow").is_file() else None
    return Prepared(rows, data_hash, meta["stats"], system_prompt, meta["notes"], eval_rows, folder)


def _build(partial: Path, recipe: Recipe, parts: list[Part], eval_source: Source | None, tokenizer,
           settings: TokenizeSettings) -> None:
    """Prepare the entry in `partial`: tokenize each source in parallel, check, split, mix, pack, write."""
    data, start = recipe.data, time.perf_counter()
    num_proc = data.num_proc or len(os.sched_getaffinity(0))
    say(f"data: tokenizing {data.label} with {num_proc} process(es) into {partial.parent} (once: later runs "
        f"read it from there)")
    notes = [note for part in parts for note in part.source.notes]
    examples = [_checked(_tokenized(p.source, partial / f"work-{i}", tokenizer, p.settings, num_proc), p.settings,
                         tokenizer, notes, p.source.label) for i, p in enumerate(parts)]
    held_out = None
    if eval_source is not None:
        held_out = _checked(_tokenized(eval_source, partial / "work-eval", tokenizer, settings, num_proc), settings,
                            tokenizer, [], eval_source.label)
    elif data.eval_split > 0:  # each source gives its share, before mixing, so no example is in both
        split = [_split(e, data.eval_split, recipe.train.seed, settings.stage) for e in examples]
        examples, held_out = [kept for kept, _ in split], _concatenated([held for _, held in split])
        notes.append(f"{len(held_out)} of {sum(len(e) for e in examples) + len(held_out)} examples held out for "
                     f"evaluation")
    sources = None
    if _mixes(parts):
        weights = [p.weight for p in parts] if parts[0].weight is not None else None
        mixed, sources = mix(examples, [p.source.label for p in parts], weights, recipe.train.seed, settings.stage)
        notes.append(describe(sources, settings.stage))
        examples = [mixed]
    stats = _write_rows(partial / "train.arrow", examples[0], settings.stage, data.max_length, data.packing)
    if sources is not None:
        stats["sources"] = sources
    if stats.get("split"):
        notes.append(f"{stats['split']} of {stats['examples']} documents are longer than max_length="
                     f"{data.max_length} and were split into blocks (not cut)")
    if held_out is not None:
        stats["eval_rows"] = _write_rows(partial / "eval.arrow", held_out, settings.stage, data.max_length,
                                         data.packing)["rows"]
    cache.seal(partial, {"stats": stats, "notes": notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "seconds": round(time.perf_counter() - start, 1), "source": data.label,
                         "num_proc": num_proc})
    for work in partial.glob("work*"):
        shutil.rmtree(work, ignore_errors=True)
    say(f"data: prepared in {time.perf_counter() - start:.1f} s")


def _mixes(parts: list[Part]) -> bool:
    """Several sources, or weights: the rows are drawn and shuffled (seeded), not read as they are."""
    return len(parts) > 1 or parts[0].weight is not None


def _concatenated(datasets_: list):
    from datasets import concatenate_datasets

    return datasets_[0] if len(datasets_) == 1 else concatenate_datasets(datasets_)


def _tokenized(source: Source, work: Path, tokenizer, settings: TokenizeSettings, num_proc: int):
    """The source's records as token ids and labels, in record order (Arrow files under `work`)."""
    from datasets import Dataset, Features, Value

    work.mkdir(parents=True, exist_ok=True)
    if num_proc > 1:  # the workers are forked: tokenizers' own threads there would only oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if source.dataset:
        records = dataset(source).map(as_raw, batched=True, with_indices=True, fn_kwargs={"label": source.label},
                                      remove_columns=dataset(source).column_names,
                                       cache_file_name=str(work / "records.arrow"))
    else:
        if next(raw(list(source.files), settings), None) is None:  # datasets cannot build a dataset of nothing
            raise LorakitError(f"{source.label}: no {'documents' if settings.stage == 'cpt' else 'conversations'} found")
        features = Features({"where": Value("string"), "file": Value("string"), "raw": Value("large_string"),
                             "continues": Value("bool"), "opens": Value("bool")})
        records = Dataset.from_generator(raw, gen_kwargs={"files": list(source.files), "settings": settings},
                                         features=features, cache_dir=str(work / "generator"))
    parallel = num_proc if num_proc > 1 and len(records) > 256 else None  # 1: in this process, no pool
    if parallel:
        children_die_with_me()
    return records.map(tokenize_batch, batched=True, batch_size=BATCH, num_proc=parallel,
                       fn_kwargs={"tokenizer": tokenizer, "settings": settings}, remove_columns=records.column_names,
                       cache_file_name=str(work / "tokens.arrow"), new_fingerprint=f"tokens-{work.name}",
                       desc="tokenizing")


def _checked(examples, settings: TokenizeSettings, tokenizer, notes: list[str], label: str):
    """The first bad record (in file order) as an error; notes on unread fields and truncation; the
    examples that are kept (empty documents dropped). Read a batch at a time, never a whole column."""
    unread: dict[tuple[str, str], list] = {}
    eot, literal, first_literal = 0, 0, None
    for batch in examples.select_columns(["error", "file", "where", "unread", "eot", "literal"]).iter(batch_size=10_000):
        found = next((e for e in batch["error"] if e), None)
        if found:
            raise LorakitError(found)
        eot += sum(batch["eot"])
        literal += sum(batch["literal"])
        first_literal = first_literal or next((w for w, f in zip(batch["where"], batch["literal"]) if f), None)
        for file, where, fields in zip(batch["file"], batch["where"], batch["unread"]):
            for name in fields:
                unread.setdefault((file, name), [0, where])[0] += 1
    notes += [f"note: {file}: field `{name}` is not read by lorakit ({count} record(s), first at "
              f"{first.removeprefix(file).strip()})" for (file, name), (count, first) in unread.items()]
    if literal:
        notes.append(literal_note(tokenizer, literal, first_literal))
    kept = examples.filter(lambda length: length > 0, input_columns="length") if settings.stage == "cpt" else examples
    if len(kept) == 0:
        raise LorakitError(f"{label}: no {'non-empty documents' if settings.stage == 'cpt' else 'conversations'} found")
    if stage_of(settings.stage).preference:
        cut = len(kept) - eot
        if cut:
            notes.append(f"{cut} of {len(kept)} answers were truncated to max_length={settings.max_length} before "
                         f"their end-of-turn token")
    elif settings.stage == "sft":
        cut = len(kept) - eot
        if cut == len(kept):
            eot = end_of_turn(tokenizer, style_for(tokenizer, settings.reasoning))
            raise LorakitError(f"no example trains the end-of-turn token {eot}: the model would "
                               f"never learn to stop; raise data.max_length")
        if cut:
            notes.append(f"{cut} of {len(kept)} conversations were truncated to max_length={settings.max_length} "
                         f"before their last end-of-turn token")
    return kept


def _split(examples, share: float, seed: int, stage: str):
    """A seeded random share of the examples (at least one) held out; the rest keep their order. A CPT
    document tokenized in pieces is held out or kept whole (mix.units)."""
    ranges = units(examples, stage)
    if len(ranges) < 2:
        raise LorakitError(f"data.eval_split needs at least 2 examples, found {len(ranges)}")
    count = min(len(ranges) - 1, max(1, round(share * len(ranges))))
    held = set(random.Random(seed).sample(range(len(ranges)), count))
    pick = lambda keep: [i for k, (a, b) in enumerate(ranges) if (k in held) != keep for i in range(a, b)]  # noqa: E731
    return examples.select(pick(True)), examples.select(pick(False))


def _iter_examples(examples, order: list[int] | None = None) -> Iterator[Example]:
    """Examples read back from Arrow a batch at a time (CPT labels are the ids themselves)."""
    source = examples.select(order) if order is not None else examples
    for batch in source.iter(batch_size=WRITE_ROWS):
        more = batch.get("continues") or [False] * len(batch["where"])
        sides = batch.get("side") or [-1] * len(batch["where"])
        for ids, labels, where, continues, side in zip(batch["input_ids"], batch["labels"], batch["where"], more, sides):
            yield Example(ids, labels or ids, where, continues, None if side < 0 else side)


def _write_rows(path: Path, examples, stage: str, max_length: int, packing: bool) -> dict:
    """Pack the examples into rows and write them as Arrow, counting what the log and manifest report."""
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    counts: dict = {}
    preference = stage_of(stage).preference
    if stage == "cpt":
        rows = stream_blocks(_iter_examples(examples), max_length, packing, counts)
    elif preference:  # two by two: each unit's examples side by side in one row
        groups = pair_rows(list(range(len(examples))), examples["length"], max_length, packing)
        flat = _iter_examples(examples, [i for group in groups for i in group])
        rows = (unit_row([next(flat) for _ in group]) for group in groups)
    elif packing:
        groups = first_fit(examples["length"], max_length)
        flat = _iter_examples(examples, [i for group in groups for i in group])
        rows = (row([(e.input_ids, e.labels) for e in (next(flat) for _ in group)]) for group in groups)
    else:
        rows = (row([(e.input_ids, e.labels)]) for e in _iter_examples(examples))
    columns = ("input_ids", "labels", "position_ids") + (("sides",) if preference else ())
    features = Features({name: Sequence(Value("int32")) for name in columns})
    stats = {"examples": len(examples), "rows": 0, "tokens": 0, "trained_tokens": 0, "eval_rows": 0}
    with ArrowWriter(features=features, path=str(path), writer_batch_size=WRITE_ROWS) as writer:
        for packed in tqdm(rows, desc="packing rows", unit=" rows", disable=not is_main(), mininterval=1):
            writer.write(packed)
            stats["rows"] += 1
            stats["tokens"] += len(packed["input_ids"])
            stats["trained_tokens"] += sum(label != IGNORE for label in packed["labels"])
        writer.finalize()
    if counts.get("split"):
        stats["split"] = counts["split"]
    return stats


