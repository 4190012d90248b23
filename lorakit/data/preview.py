"""`lorakit preview`: examples as text, split into trained and masked spans, so a user can check
the loss mask before spending hours on a run."""

from __future__ import annotations

from itertools import groupby

from .blocks import IGNORE, Example


def side_name(stage_name: str, side: int | None) -> str:
    """How preview heads a preference example: " (chosen)", " (rejected)", KTO's " (desirable)"...; "" otherwise."""
    from ..stages import CHOSEN, KL, REJECTED, stage

    if side is None:
        return ""
    names = {CHOSEN: "chosen", REJECTED: "rejected"} if stage(stage_name).data == "pairs" else \
        {CHOSEN: "desirable", REJECTED: "undesirable", KL: "KL estimate: this prompt with another record's answer"}
    return f" ({names[side]})"


def spans(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) runs of one example, in order."""
    runs = groupby(zip(example.input_ids, example.labels), key=lambda pair: pair[1] != IGNORE)
    return [(tokenizer.decode([token for token, _ in run]), trained) for trained, run in runs]
