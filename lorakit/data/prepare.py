"""A recipe's data, from files to training rows, with the facts the log and the manifest report."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def stats(self) -> dict:
        return {
            "examples": len(self.examples),
            "rows": len(self.rows),
            "tokens": sum(len(r["input_ids"]) for r in self.rows),
            "trained_tokens": sum(sum(label != IGNORE for label in r["labels"]) for r in self.rows),
        }


def prepare(recipe, tokenizer) -> Prepared:
    """Load, check, tokenize and pack the recipe's data; raises LorakitError naming the bad record."""
    data = recipe.data
    if recipe.stage == "cpt":
        documents, files = load_documents(data.path)
        examples = tokenize_documents(documents, tokenizer)
        rows, split = stream_blocks(examples, data.max_length, data.packing)
        notes = [f"{split} of {len(documents)} documents are longer than max_length={data.max_length} "
                 f"and were split into blocks (not cut)"] if split else []
        return Prepared(examples, rows, fingerprint_files(files), None, notes)
    conversations, files = load_conversations(data.path)
    system_prompt = data.system_prompt if data.system_prompt is not None else template_system_prompt(tokenizer)
    examples, cut = tokenize_conversations(conversations, tokenizer, data.max_length, system_prompt)
    notes = [f"{cut} of {len(examples)} conversations were truncated to max_length={data.max_length} "
             f"before their last end-of-turn token"] if cut else []
    rows = pack_examples(examples, data.max_length, data.packing)
    return Prepared(examples, rows, fingerprint_files(files), system_prompt, notes)
