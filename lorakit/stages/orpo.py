"""ORPO (Hong et al. 2024; trl's ORPOTrainer): no reference model; the chosen answer's NLL plus beta times the
log-odds ratio of chosen over rejected (average log-probabilities per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .stage import Sequences, Stage, rewards


def loss(s: Sequences, pref, beta: float):
    chosen, rejected = s.pair(s.average())
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    total = s.chosen_nll() * (1 + pref.sft_weight) - beta * ratio.mean()
    return total, {**rewards(beta * chosen.detach(), beta * rejected.detach()),
                   "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}


STAGE = Stage("orpo", "pairs", "chosen and rejected answers, no reference: NLL plus an odds-ratio term", loss,
              beta=0.1)
