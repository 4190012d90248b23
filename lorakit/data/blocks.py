"""Examples -> training rows, and rows -> batches.

A row holds one or more examples side by side. Each example's positions restart at 0, and no
attention mask is passed, so transformers builds a block-diagonal causal mask from the position ids:
attention never crosses examples, and no compute goes to padding inside a packed row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str


def _row(pieces: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    ids, labels, positions = [], [], []
    for index, (piece_ids, piece_labels) in enumerate(pieces):
        ids += piece_ids
        # The first token of a later piece would be "predicted" from the previous example: not a target.
        labels += ([IGNORE] + piece_labels[1:]) if index else piece_labels
        positions += range(len(piece_ids))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def stream_blocks(examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    """CPT rows: documents cut into blocks of max_length, never truncated.

    With packing, documents run on into the next one so every block but the last is full (documents
    longer than max_length are split across blocks; `prepare` says how many).
    """
    rows, pieces, room = [], [], max_length
    for example in examples:
        start = 0
        while start < len(example.input_ids):
            take = min(room, len(example.input_ids) - start)
            pieces.append((example.input_ids[start:start + take], example.labels[start:start + take]))
            start += take
            room -= take
            if room == 0 or not packing:
                rows.append(_row(pieces))
                pieces, room = [], max_length
    if pieces:
        rows.append(_row(pieces))
    return rows


def pack_examples(examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    """SFT rows: whole examples (already truncated to max_length), packed first-fit, longest first."""
    if not packing:
        return [_row([(e.input_ids, e.labels)]) for e in examples]
    bins: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        size = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([])
            room.append(max_length)
            slot = len(bins) - 1
        bins[slot].append((example.input_ids, example.labels))
        room[slot] -= size
    return [_row(pieces) for pieces in bins]


class Collator:
    """Pads a batch of rows to its longest row, and keeps the running count of real (non-padding)
    tokens per batch built: the data loader builds batches ahead of training, so tokens trained are
    read as `tokens_in(first n batches)`, not as a running total."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.cumulative = [0]

    def tokens_in(self, batches: int) -> int:
        return self.cumulative[min(batches, len(self.cumulative) - 1)]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        self.cumulative.append(self.cumulative[-1] + sum(len(r["input_ids"]) for r in rows))
        for r in rows:
            gap = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * gap)
            batch["labels"].append(r["labels"] + [IGNORE] * gap)
            # Padding restarts its positions, so it is a segment of its own that no real token sees.
            batch["position_ids"].append(r["position_ids"] + list(range(gap)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
