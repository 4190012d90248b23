"""Several datasets in one run, mixed by weight: domain text with a share of general text replayed against
forgetting, or three chat sets at 60/30/10.

Weights are shares of the examples (documents or conversations), as LLaMA-Factory's `interleave_probs`
draws them. An epoch holds as many examples as the sources hold together; source i contributes
round(share_i x that) of them, sampled without replacement: fewer than it holds is a seeded random subset,
more is every example as many whole times as fit, then a random subset for the rest (no example is used
twice more often than another of its source). The mixed examples are shuffled (seeded) so that sources
interleave. A CPT document tokenized in pieces is drawn whole.
"""

from __future__ import annotations

import random

from ..stages import stage as stage_of


def targets(counts: list[int], weights: list[float] | None) -> list[int]:
    """Examples each source contributes per epoch."""
    if weights is None:
        return list(counts)
    total, mass = sum(counts), sum(weights)
    return [max(1, round(total * w / mass)) for w in weights]


def pick(available: int, wanted: int, rng: random.Random) -> list[int]:
    """`wanted` indices of `available`: whole passes, then a random subset, each index at most once more."""
    whole, rest = divmod(wanted, available)
    return list(range(available)) * whole + sorted(rng.sample(range(available), rest))


def units(part, stage: str) -> list[tuple[int, int]]:
    """(start, end) example ranges drawn as one: an example, a preference record's two, or a CPT document's run
    of pieces."""
    kind = stage_of(stage).data
    if kind != "text":
        step = 1 if kind == "chat" else 2
        return [(i, i + step) for i in range(0, len(part), step)]
    found, start = [], 0
    for index, more in enumerate(part["continues"]):
        if not more:
            found.append((start, index + 1))
            start = index + 1
    return found


def mix(parts: list, labels: list[str], weights: list[float] | None, seed: int, stage: str):
    """The examples of `parts` (datasets.Dataset each) mixed by `weights`: the mixed Dataset and, per
    source, what was used (for the log, `data prepare`, preview and the manifest)."""
    from datasets import concatenate_datasets

    rng = random.Random(seed)
    ranges = [units(part, stage) for part in parts]
    wanted = targets([len(r) for r in ranges], weights)
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    chosen, report = [], []
    for part, label, weight, found, count, offset in zip(parts, labels, weights or [None] * len(parts), ranges,
                                                         wanted, offsets):
        picked = [found[i] for i in pick(len(found), count, rng)]
        lengths = part["length"]
        chosen += [(offset + start, offset + end) for start, end in picked]
        report.append({"path": label, "weight": weight, "available": len(found), "used": count,
                       "tokens": sum(sum(lengths[start:end]) for start, end in picked)})
    if weights is not None:
        rng.shuffle(chosen)
    total_used, total_tokens = sum(r["used"] for r in report), sum(r["tokens"] for r in report)
    for entry in report:
        entry["share"] = round(entry["used"] / total_used, 4)
        entry["token_share"] = round(entry["tokens"] / max(1, total_tokens), 4)
    mixed = concatenate_datasets(parts).select([i for start, end in chosen for i in range(start, end)])
    return mixed, report


def describe(report: list[dict], stage: str) -> str:
    """One line for the log: each source's share, how it was drawn, and its share of the tokens."""
    what = {"text": "documents", "chat": "conversations"}.get(stage_of(stage).data, "preference records")
    shown = []
    for r in report:
        drawn = "all" if r["used"] == r["available"] else (
            f"its {r['available']:,} repeated {r['used'] / r['available']:.2f}x" if r["used"] > r["available"]
            else f"{r['used'] / r['available']:.0%} of its {r['available']:,}, sampled")
        shown.append(f"{r['path']} {r['share']:.1%} of {what} ({r['used']:,}: {drawn}; {r['token_share']:.1%} "
                     f"of tokens)")
    return "data mix: " + ", ".join(shown)
