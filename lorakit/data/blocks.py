"""Examples -> training rows, and rows -> batches.

A row holds one or more examples side by side. Each example's positions restart at 0, and no
attention mask is passed, so transformers builds a block-diagonal causal mask from the position ids:
attention never crosses examples, and no compute goes to padding inside a packed row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str
    continues: bool = False
    """CPT: a piece of a long document (tokenized in pieces) that the next example goes on with."""
    side: int | None = None
    """Preference stages: the answer's side (stages.CHOSEN, REJECTED or KL); None for CPT and SFT."""


def row(pieces: list[tuple[list[int], list[int]]], sides: list[int] | None = None) -> dict[str, list[int]]:
    """One training row of examples (ids, labels) side by side, positions restarting for each; with `sides`
    (preference stages), each example's side, in order."""
    ids, labels, positions = [], [], []
    for index, (piece_ids, piece_labels) in enumerate(pieces):
        ids += piece_ids
        # The first token of a later piece would be "predicted" from the previous example: not a target.
        labels += ([IGNORE] + piece_labels[1:]) if index else piece_labels
        positions += range(len(piece_ids))
    made = {"input_ids": ids, "labels": labels, "position_ids": positions}
    return made if sides is None else {**made, "sides": sides}


def stream_blocks(examples: Iterable[Example], max_length: int, packing: bool, counts: dict | None = None) -> Iterator[dict]:
    """CPT rows: documents cut into blocks of max_length, never truncated; a generator, so a corpus of
    any size streams through.

    With packing, documents run on into the next one so every block but the last is full (documents
    longer than max_length are split across blocks, counted in counts["split"] when given).
    """
    pieces, room, joined, length = [], max_length, False, 0
    for example in examples:
        length += len(example.input_ids)
        start = 0
        while start < len(example.input_ids):
            take = min(room, len(example.input_ids) - start)
            chunk = (example.input_ids[start:start + take], example.labels[start:start + take])
            # the next piece of the same document goes on in the same segment, as if tokenized whole
            if joined:
                pieces[-1] = (pieces[-1][0] + chunk[0], pieces[-1][1] + chunk[1])
            else:
                pieces.append(chunk)
            joined = True
            start += take
            room -= take
            if room == 0:
                yield row(pieces)
                pieces, room, joined = [], max_length, False
        if example.continues:
            continue
        if counts is not None and length > max_length:
            counts["split"] = counts.get("split", 0) + 1
        joined, length = False, 0
        if pieces and not packing:
            yield row(pieces)
            pieces, room = [], max_length
    if pieces:
        yield row(pieces)


def first_fit(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of examples grouped into rows: longest first, each into the first row it fits.

    The first row with room is found in a segment tree of the rows' free space (O(log rows) per example),
    so a million conversations pack in seconds; a linear scan over the rows took quadratic time."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [0] * (2 * size)  # the largest free space in each subtree; leaves are rows (0: not opened)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if tree[1] >= need:
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            slot = node - size
        else:
            slot = len(bins)
            bins.append([])
            node = size + slot
            tree[node] = max_length
        bins[slot].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: list[Example], max_length: int, packing: bool) -> list[dict]:
    """SFT rows: whole examples (already truncated to max_length), packed first-fit, longest first.
    Preference examples come in twos (chosen and rejected, or KTO's answer and its KL sequence) that stay
    together in one row (pair_rows)."""
    if examples and examples[0].side is not None:
        return [unit_row(unit) for unit in pair_rows(examples, [len(e.input_ids) for e in examples], max_length,
                                                         packing)]
    if not packing:
        return [row([(e.input_ids, e.labels)]) for e in examples]
    return [row([(examples[i].input_ids, examples[i].labels) for i in group])
            for group in first_fit([len(e.input_ids) for e in examples], max_length)]


def pair_rows(examples, lengths: Sequence[int], max_length: int, packing: bool):
    """The examples of each row, two by two (a preference unit), packed first-fit into rows of max_length tokens
    as SFT's are; a pair longer than that has a row of its own (up to 2 x max_length)."""
    units = [lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2)]
    groups = first_fit(units, max_length) if packing else [[u] for u in range(len(units))]
    return [[examples[i] for u in group for i in (2 * u, 2 * u + 1)] for group in groups]


def unit_row(examples: list[Example]) -> dict[str, list[int]]:
    """One row of preference examples, each with its side."""
    return row([(e.input_ids, e.labels) for e in examples], [e.side for e in examples])


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
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if "sides" in rows[0]:
            out.update(_sequences(rows, width))
        return out


def _sequences(rows: list[dict], width: int) -> dict[str, torch.Tensor]:
    """Preference batches: each token's sequence (numbered across the batch; -1 for padding) and each
    sequence's side, and its reference log-probability where it was precomputed."""
    segment, sides, reference, count = [], [], [], 0
    for r in rows:
        starts = torch.tensor(r["position_ids"]) == 0
        numbers = (starts.cumsum(0) - 1 + count).tolist()
        segment.append(numbers + [-1] * (width - len(numbers)))
        sides += r["sides"]
        reference += r.get("reference") or []
        count += len(r["sides"])
    out = {"segment": torch.tensor(segment, dtype=torch.long), "sides": torch.tensor(sides, dtype=torch.long)}
    if reference:
        out["reference"] = torch.tensor(reference, dtype=torch.float32)
    return out
