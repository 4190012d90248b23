"""The preference stages' step: one forward pass over packed answers gives each answer's summed log-probability
(stages.Sequences); the reference's come from a second pass without gradients through the same model with the
adapter switched off (the parent chain stays merged in the base), or from an explicit frozen copy for method
full, or from the data cache (pref.reference: precomputed); the stage's loss does the rest.

Packed rows hold both answers of many pairs side by side; each attends only within itself (attention.py), so
every log-probability is the unpacked one, without the padding trl's DPOTrainer spends on a batch of
[chosen..., rejected...] padded to the longest.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ..data.blocks import IGNORE
from ..stages import Sequences, Stage
from .loss import CHUNK_TOKENS, bias_of, install, output_head, remove, through_head

EXTRA = ("segment", "sides", "reference")
"""Batch keys that are not the model's inputs (data.blocks.Collator)."""


class _LinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] per token, a chunk of tokens at a time: only one chunk's
    logits ever exist (Qwen2's 151,936-word head makes a 1024-token sequence's logits 600 MB in fp32). The
    backward pass recomputes each chunk's softmax, since every answer's log-probability gets its own gradient
    (training/loss.py's fused cross-entropy can fold the gradient in during the forward pass only because
    its loss is one sum)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        ctx.hidden_dtype = hidden.dtype
        hidden = hidden.to(weight.dtype)
        out = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            logits = F.linear(hidden[start:start + CHUNK_TOKENS], weight, bias).float()
            t = targets[start:start + CHUNK_TOKENS]
            out[start:start + CHUNK_TOKENS] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            h, t = hidden[start:start + CHUNK_TOKENS], targets[start:start + CHUNK_TOKENS]
            g = grad_out[start:start + CHUNK_TOKENS].float()[:, None]
            grad = -torch.softmax(F.linear(h, weight, bias).float(), dim=-1) * g  # d logp / d logits = onehot - p
            grad[torch.arange(t.numel(), device=t.device), t] += g.squeeze(1)
            through_head(grad, h, weight, start, grad_hidden, grad_weight, grad_bias)
        return grad_hidden.to(ctx.hidden_dtype), grad_weight, grad_bias, None


def answer_logps(model, inputs: dict, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its labelled (answer) tokens, and their count. With `head`, the
    model returns hidden states (its head swapped out, training/loss.install) and the head is applied here in
    chunks; without, the model's own logits are read."""
    outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE
    states, targets = outputs.logits[:, :-1][keep], targets[keep]
    if head is not None:
        token = _LinearLogProbs.apply(states, head.weight, bias_of(head), targets)
    else:
        token = states.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    sequence, count = inputs["segment"][:, 1:][keep], inputs["sides"].numel()
    logps = torch.zeros(count, dtype=torch.float32, device=token.device).index_add(0, sequence, token)
    return logps, torch.bincount(sequence, minlength=count)


class PreferenceStep:
    """The loss of one micro-batch for a preference stage, and the metrics to log (averaged between logs)."""

    def __init__(self, stage: Stage, pref, chunked: bool, reference_model=None):
        self.stage, self.pref, self.chunked, self.reference_model = stage, pref, chunked, reference_model
        self.beta = pref.beta if pref.beta is not None else stage.beta
        self.metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def loss(self, trainer, model, inputs: dict) -> torch.Tensor:
        owner = trainer.model  # the model under any DDP wrapper: its head is swapped, its adapter switched off
        head = output_head(owner) if self.chunked else None
        if self.chunked:
            install(owner)
        try:
            logps, tokens = answer_logps(model, inputs, head)
            reference = inputs.get("reference")
            if reference is None and self.stage.reference:
                reference = self.reference(model, owner, inputs, head)
        finally:
            if self.chunked:
                remove(owner)
        loss, metrics = self.stage.loss(Sequences(logps, tokens, inputs["sides"], reference), self.pref, self.beta)
        mode = "train" if model.training else "eval"
        # one gather (and one device sync) for all of them, [processes, metrics] after gathering
        values = trainer.accelerator.gather(torch.stack([v.detach().float() for v in metrics.values()])[None])
        for name, value in zip(metrics, values.nanmean(0).tolist()):
            self.metrics[mode][name].append(value)
        return loss

    @torch.no_grad()
    def reference(self, model, owner, inputs: dict, head) -> torch.Tensor:
        """Through the model as the Trainer wrapped it (FSDP's shards gather there), its adapter switched off."""
        if self.reference_model is not None:  # method full: the frozen copy, its own head applied in chunks
            head = output_head(self.reference_model)
            install(self.reference_model)
            try:
                return answer_logps(self.reference_model, inputs, head)[0]
            finally:
                remove(self.reference_model)
        with owner.disable_adapter():
            return answer_logps(model, inputs, head)[0]

    def logged(self, mode: str) -> dict[str, float]:
        """The metrics gathered since the last log, averaged (eval's prefixed eval_ as the Trainer's are)."""
        found = self.metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        kept = {name: [v for v in values if v == v] for name, values in found.items()}  # NaN: none of that kind
        averaged = {f"{prefix}{name}": round(sum(values) / len(values), 6) for name, values in kept.items() if values}
        found.clear()
        return averaged


def reference_copy(model, dtype: torch.dtype):
    """Method full: the policy's starting weights, frozen, in the compute dtype (lorakit plan counts them)."""
    import copy

    from ..log import say

    reference = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in reference.parameters())
    say(f"reference model: a frozen copy of the starting weights ({size / 2**30:.2f} GiB; method full)")
    return reference
