"""A training stage: what data it reads and what it minimises. Each stage is one module of this package,
registered in __init__ the same way, as trl has one trainer per method.

The preference stages share one forward pass (training/preference.py): every answer of the batch, packed, gives
the summed log-probability of its tokens (`Sequences`); a stage's `loss` turns those (and the reference's) into
its loss and the metrics trl logs under the same names (rewards/chosen, rewards/accuracies, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

CHOSEN, REJECTED, KL = 1, 0, 2
"""A sequence's side: the chosen answer (or KTO's desirable one), the rejected (undesirable) one, or KTO's
mismatched prompt + completion that estimates the KL term."""


@dataclass
class Sequences:
    """The answers of one batch: per sequence, the summed log-probability of its answer tokens under the
    policy (with gradients) and the reference (None for reference-free stages), its answer tokens and side.
    Pairs come chosen first, rejected next, side by side, so the two selections line up."""

    logps: torch.Tensor
    tokens: torch.Tensor
    sides: torch.Tensor
    reference: torch.Tensor | None = None

    def side(self, values: torch.Tensor, side: int) -> torch.Tensor:
        return values[self.sides == side]

    def pair(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.side(values, CHOSEN), self.side(values, REJECTED)

    def average(self) -> torch.Tensor:
        """Log-probability per answer token (SimPO's and ORPO's length-normalised score)."""
        return self.logps / self.tokens.clamp(min=1)

    def chosen_nll(self) -> torch.Tensor:
        """The chosen answers' negative log-likelihood per token over the batch (trl's "sft" loss)."""
        return -self.side(self.logps, CHOSEN).sum() / self.side(self.tokens, CHOSEN).sum().clamp(min=1)


Loss = Callable[[Sequences, object, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(the batch's sequences, the recipe's pref settings, beta) -> (the loss, metrics to log)."""


@dataclass(frozen=True)
class Stage:
    name: str
    data: Literal["text", "chat", "pairs", "unpaired"]
    """text: documents (CPT); chat: conversations (SFT); pairs: a prompt with a chosen and a rejected answer;
    unpaired: a prompt with one answer labelled desirable or not (KTO)."""
    summary: str
    loss: Loss | None = None
    """None: the causal-LM loss on the labelled tokens (training/loss.py)."""
    reference: bool = False
    """The loss compares the policy with the reference model (the adapter switched off)."""
    beta: float | None = None
    """pref.beta when the recipe leaves it out."""

    @property
    def preference(self) -> bool:
        return self.loss is not None

    @property
    def chat(self) -> bool:
        """Its data is rendered with the model's chat template (and its adapters answer in chat)."""
        return self.data != "text"


def rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """What trl logs of a pair's implicit rewards: each side's mean, their margin and how often chosen wins."""
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
