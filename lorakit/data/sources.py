"""A recipe's data as sources: what each `data.path` entry names (files or a dataset), how its records are
handed on (JSON text, long CPT documents in pieces), and its fingerprint. Shared by the cached preparation
(prepare.py) and the streaming and in-memory paths (stream.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorakitError, first_line
from ..recipe import Recipe
from ..stages import stage as stage_of
from ..system.hub import hub_reachable
from .files import (
    RECORD_SUFFIXES,
    TEXT_SUFFIXES,
    Source,
    fingerprint_files,
    raw_records,
    resolve,
)
from .template import template_system_prompt
from .tokenize import TokenizeSettings, pieces


@dataclass
class Prepared:
    rows: Any
    """Training rows: a memory-mapped datasets.Dataset, or an IterableDataset when streaming."""
    data_hash: str
    stats: dict
    """examples, rows, tokens, trained_tokens, eval_rows, split (CPT documents split into blocks),
    truncated (SFT conversations cut before their last end-of-turn)."""
    system_prompt: str | None = None
    notes: list[str] = field(default_factory=list)
    eval_rows: Any = None
    location: Path | None = None
    """The cache entry the rows were read from (None when streaming)."""


@dataclass(frozen=True)
class Part:
    """One source of the recipe's data, with the settings its records are tokenized with."""

    source: Source
    settings: TokenizeSettings
    weight: float | None = None


def plan(recipe: Recipe, tokenizer) -> tuple[list[Part], Source | None, TokenizeSettings]:
    """The recipe's sources, its eval source, and the settings shared by all (field aside)."""
    import dataclasses

    data, stage = recipe.data, recipe.stage
    suffixes = TEXT_SUFFIXES if stage == "cpt" else RECORD_SUFFIXES
    system_prompt = None
    if stage_of(stage).chat:
        system_prompt = data.system_prompt if data.system_prompt is not None else template_system_prompt(tokenizer)
    settings = TokenizeSettings(stage, data.max_length, system_prompt, data.field, data.reasoning)
    parts = [Part(resolve(s.path, suffixes, s.split), dataclasses.replace(settings, field=s.field), s.weight)
             for s in data.sources]
    eval_source = resolve(data.eval_path, suffixes, data.split) if data.eval_path else None
    return parts, eval_source, settings


def fingerprint(source: Source) -> str:
    if source.files:
        return fingerprint_files(source.files)
    return dataset(source)._fingerprint  # datasets' own fingerprint of the folder's or the hub's data


def fingerprint_parts(parts: list[Part]) -> str:
    """The data's hash in the manifest and the cache key: a lone source's own, else of every source with
    its weight and field."""
    if len(parts) == 1 and parts[0].weight is None:
        return fingerprint(parts[0].source)
    import xxhash

    listed = [[fingerprint(p.source), p.weight, p.settings.field] for p in parts]
    return xxhash.xxh3_128(json.dumps(listed).encode()).hexdigest()[:16]


def raw(files: list[Path], settings: TokenizeSettings) -> Iterator[dict]:
    """Each record as JSON text, where it came from, and (CPT) whether it is a piece of a long document
    that the next record goes on with, or the first piece of one (opens): a long document is handed on in
    pieces, never whole."""
    for file in files:
        for where, text in raw_records(file):
            split = pieces(where, text, settings.field) if settings.stage == "cpt" else None
            if split is None:
                yield {"where": where, "file": str(file), "raw": text, "continues": False, "opens": True}
                continue
            key = settings.field or "text"
            for index, piece in enumerate(split):
                yield {"where": where, "file": str(file), "raw": json.dumps({key: piece}, ensure_ascii=False),
                       "continues": index < len(split) - 1, "opens": index == 0}


def as_raw(batch: dict, indices: list[int], label: str) -> dict:
    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*batch.values())] if names else [{} for _ in indices]
    return {"where": [f"{label} row {i + 1}" for i in indices], "file": [label] * len(indices),
            "raw": [json.dumps(row, ensure_ascii=False, default=str) for row in rows], "continues": [False] * len(rows),
            "opens": [True] * len(rows)}


def dataset(source: Source):
    """A datasets folder (save_to_disk) or a hub dataset, as a Dataset of the chosen split."""
    import datasets

    if source.dataset.startswith("hf:"):
        return _hub(source)
    loaded = datasets.load_from_disk(source.dataset)
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise LorakitError(f"{source.label}: no split {source.split!r} (data.split); it has {', '.join(loaded)}")
        loaded = loaded[source.split]
    return loaded


def _hub(source: Source):
    import datasets

    name = source.dataset.removeprefix("hf:")
    if not hub_reachable():
        raise LorakitError(f"{source.label}: the hub dataset cannot be downloaded here (the hub is unreachable); "
                           f"download it where it is reachable (datasets.load_dataset({name!r}).save_to_disk(DIR)) "
                           f"and set data.path: DIR")
    try:
        return datasets.load_dataset(name, split=source.split)
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise LorakitError(f"{source.label}: cannot load the hub dataset ({first_line(exc)})") from None
