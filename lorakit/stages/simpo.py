"""SimPO (Meng et al. 2024; trl's CPOTrainer with loss_type "simpo"): no reference model; the chosen answer's
average log-probability per token must beat the rejected one's by a margin (pref.simpo_gamma)."""

from __future__ import annotations

import torch.nn.functional as F

from .stage import Sequences, Stage, rewards


def loss(s: Sequences, pref, beta: float):
    chosen, rejected = s.pair(s.average())
    logits = chosen - rejected - pref.simpo_gamma / beta
    smoothing = pref.label_smoothing
    total = (-F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing).mean()
    if pref.sft_weight:
        total = total + pref.sft_weight * s.chosen_nll()
    return total, {**rewards(beta * chosen.detach(), beta * rejected.detach()),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}


STAGE = Stage("simpo", "pairs", "chosen and rejected answers, no reference: length-normalised margin", loss, beta=2.0)
