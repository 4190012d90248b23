"""`lorakit preview`: examples as text, split into trained and masked spans, so a user can check
the loss mask before spending hours on a run."""

from __future__ import annotations

from itertools import groupby

from .blocks import IGNORE, Example


def spans(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) runs of one example, in order."""
    runs = groupby(zip(example.input_ids, example.labels), key=lambda pair: pair[1] != IGNORE)
    return [(tokenizer.decode([token for token, _ in run]), trained) for trained, run in runs]
