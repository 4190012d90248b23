"""The training stages, one module each, registered here the same way (as trl has one trainer per method)."""

from __future__ import annotations

from . import cpt, dpo, kto, orpo, sft, simpo
from .stage import CHOSEN, KL, REJECTED, Sequences, Stage

STAGES: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (cpt, sft, dpo, kto, orpo, simpo)}


def stage(name: str) -> Stage:
    return STAGES[name]


__all__ = ["CHOSEN", "KL", "REJECTED", "STAGES", "Sequences", "Stage", "stage"]
