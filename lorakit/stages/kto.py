"""KTO (Ethayarajh et al. 2024; trl's KTOTrainer): single answers labelled desirable or not, each pushed up or
down against the reference, relative to an estimate of the KL between policy and reference (from mismatched
prompt + completion pairs of the same batch, as trl builds them)."""

from __future__ import annotations

import torch

from .stage import CHOSEN, KL, REJECTED, Sequences, Stage


def loss(s: Sequences, pref, beta: float):
    ratios = s.logps - s.reference
    kl = s.side(ratios, KL).detach()
    kl = _mean_over_processes(kl).clamp(min=0)
    chosen, rejected = s.side(ratios, CHOSEN), s.side(ratios, REJECTED)
    losses = torch.cat([pref.desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        pref.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    right = torch.cat([(chosen > 0).float(), (rejected < 0).float()])
    # A batch may hold only one kind of answer: its other mean is NaN, which the logged averages skip (every
    # process logs the same names, as gathering them across processes needs).
    metrics = {"kl": kl, "rewards/accuracies": right.mean(), "rewards/chosen": beta * chosen.detach().mean(),
               "rewards/rejected": beta * rejected.detach().mean()}
    total = losses.mean()
    if pref.sft_weight and chosen.numel():
        total = total + pref.sft_weight * s.chosen_nll()
    return total, metrics


def _mean_over_processes(kl: torch.Tensor) -> torch.Tensor:
    """The KL estimate of the whole global batch (trl gathers it across processes too)."""
    total = torch.stack([kl.sum(), torch.tensor(float(kl.numel()), device=kl.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total[0] / total[1].clamp(min=1)


STAGE = Stage("kto", "unpaired", "answers labelled desirable or not, against the reference", loss, reference=True,
              beta=0.1)
