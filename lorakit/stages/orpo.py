"""ORPO (Hong et al. 2024; trl's ORPOTrainer): no reference model; the chosen answer's NLL plus beta times the
log-odds ratio of chosen over rejected (average log-probabilities per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .stage import Sequences, Stage, rewards


def loss(s: Sequences, pref, beta: float):
    chosen, rejected = s.pair(s.average())
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    total = s.chosen_nll() * (1 + pref.sft_weight) - beta * ratio.mean()
    return total, {**rewards(beta * chosen.detach(), beta * rejected.detach()),
                   "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 (an answer the model is already sure of) as trl's log1mexp is."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


STAGE = Stage("orpo", "pairs", "chosen and rejected answers, no reference: NLL plus an odds-ratio term", loss,
              beta=0.1)
