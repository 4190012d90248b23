"""DPO and its variants (trl's DPOTrainer loss types): the chosen answer's log-ratio to the reference pushed
above the rejected one's. The formulas are trl's (trl/trainer/dpo_trainer.py); tests/test_preference.py checks
the losses and gradients against trl's DPOTrainer on the same pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .stage import Sequences, Stage, rewards


def _losses(name: str, chosen: torch.Tensor, rejected: torch.Tensor, s: Sequences, pref, beta: float) -> torch.Tensor:
    """One of trl's per-pair losses, from the chosen and rejected log-ratios to the reference."""
    delta, smoothing = chosen - rejected, pref.label_smoothing
    if name == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if name == "hinge":
        return torch.relu(1 - beta * delta)
    if name in ("ipo", "sigmoid_norm"):  # per-token averages of the log-ratios
        tokens_chosen, tokens_rejected = s.pair(s.tokens.clamp(min=1))
        average = chosen / tokens_chosen - rejected / tokens_rejected
        return (average - 1 / (2 * beta)) ** 2 if name == "ipo" else -F.logsigmoid(beta * average)
    if name == "robust":
        return (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * smoothing)
    if name == "bco_pair":
        return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    if name == "nca_pair":
        return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    if name == "sppo_hard":
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if name == "apo_down":
        return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * delta)
    raise ValueError(name)  # the recipe's check names the valid ones


def loss(s: Sequences, pref, beta: float):
    chosen, rejected = (policy - reference for policy, reference in zip(s.pair(s.logps), s.pair(s.reference)))
    weights = pref.loss_weights or [1.0] * len(pref.losses)
    total = sum(w * _losses(name, chosen, rejected, s, pref, beta).mean() for name, w in zip(pref.losses, weights))
    if pref.sft_weight:
        total = total + pref.sft_weight * s.chosen_nll()
    logps_chosen, logps_rejected = s.pair(s.logps.detach())
    return total, {**rewards(beta * chosen.detach(), beta * rejected.detach()),
                   "logps/chosen": logps_chosen.mean(), "logps/rejected": logps_rejected.mean()}


STAGE = Stage("dpo", "pairs", "chosen and rejected answers, against the reference (the adapter off)", loss,
              reference=True, beta=0.1)
