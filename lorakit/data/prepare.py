"""A recipe's data, from files to training (and evaluation) rows, with the facts the log and the
manifest report."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import LorakitError
from ..recipe import Recipe
from .blocks import IGNORE, Example, pack_examples, stream_blocks
from .chat import load_conversations, template_system_prompt, tokenize_conversations
from .files import fingerprint_files
from .text import load_documents, tokenize_documents


@dataclass
class Prepared:
    examples: list[Example]
    rows: list[dict]
    data_hash: str
    system_prompt: str | None = None
    notes: list[str] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)

    @property
    def stats(self) -> dict:
        return {
            "examples": len(self.examples),
            "rows": len(self.rows),
            "tokens": sum(len(r["input_ids"]) for r in self.rows),
            "trained_tokens": sum(sum(label != IGNORE for label in r["labels"]) for r in self.rows),
            "eval_rows": len(self.eval_rows),
        }


def load_examples(stage: str, path, tokenizer, max_length: int, system_prompt: str | None):
    """Examples of a data path for a stage, the files read, and notes for the log."""
    if stage == "cpt":
        documents, files = load_documents(path)
        examples = tokenize_documents(documents, tokenizer)
        long = sum(len(e.input_ids) > max_length for e in examples)
        notes = [f"{long} of {len(examples)} documents are longer than max_length={max_length} "
                 f"and were split into blocks (not cut)"] if long else []
        return examples, files, notes
    conversations, files, notes = load_conversations(path)
    examples, cut = tokenize_conversations(conversations, tokenizer, max_length, system_prompt)
    notes += [f"{cut} of {len(examples)} conversations were truncated to max_length={max_length} "
              f"before their last end-of-turn token"] if cut else []
    return examples, files, notes


def to_rows(stage: str, examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    if stage == "cpt":
        return stream_blocks(examples, max_length, packing)
    return pack_examples(examples, max_length, packing)


def prepare(recipe: Recipe, tokenizer) -> Prepared:
    """Load, check, tokenize and pack the recipe's data; raises LorakitError naming the bad record."""
    data, stage = recipe.data, recipe.stage
    system_prompt = None
    if stage == "sft":
        system_prompt = data.system_prompt if data.system_prompt is not None else template_system_prompt(tokenizer)
    examples, files, notes = load_examples(stage, data.path, tokenizer, data.max_length, system_prompt)
    held_out: list[Example] = []
    if data.eval_path:
        held_out = load_examples(stage, data.eval_path, tokenizer, data.max_length, system_prompt)[0]
    elif data.eval_split > 0:
        examples, held_out = _split(examples, data.eval_split, recipe.train.seed)
        notes.append(f"{len(held_out)} of {len(examples) + len(held_out)} examples held out for evaluation")
    return Prepared(examples, to_rows(stage, examples, data.max_length, data.packing), fingerprint_files(files),
                    system_prompt, notes, to_rows(stage, held_out, data.max_length, data.packing))


def _split(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random share of the examples (at least one) held out; the rest keep their order."""
    if len(examples) < 2:
        raise LorakitError(f"data.eval_split needs at least 2 examples, found {len(examples)}")
    count = min(len(examples) - 1, max(1, round(share * len(examples))))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
