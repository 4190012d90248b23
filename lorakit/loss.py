"""The causal-LM loss without the full logits tensor.

Qwen2's 151,936-word vocabulary makes the logits of one 1024-token sequence 600 MB in fp32, and the
Trainer's default path keeps them, their fp32 copy and their gradient alive at once: most of the
peak memory of a LoRA run. Here the output head is swapped for a pass-through during training, and
the loss applies the real head in chunks of tokens, each recomputed in the backward pass
(checkpointed), so only one chunk's logits exist at a time. Only positions that carry a label go
through the head at all: for chat SFT, the masked system and user tokens cost nothing there.
Written here because transformers' Trainer and peft have no chunked loss; trl's is tied to its own
trainer classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 256  # 256 x 151,936 logits: ~150 MB in fp32 per chunk
IGNORE = -100


class PassThroughHead(nn.Module):
    """Stands where lm_head was: the model returns hidden states; `head` keeps the real weights."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _owner(model) -> nn.Module:
    """The transformers model that holds lm_head, under peft's wrappers if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(model) -> None:
    owner = _owner(model)
    if not isinstance(owner.lm_head, PassThroughHead):
        owner.lm_head = PassThroughHead(owner.lm_head)


def remove(model) -> None:
    owner = _owner(model)
    if isinstance(owner.lm_head, PassThroughHead):
        owner.lm_head = owner.lm_head.head


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> torch.Tensor:
    # The head runs in its weights' dtype (as autocast would: the loss runs outside the autocast that
    # wraps the model's forward), the softmax in fp32.
    return F.cross_entropy(F.linear(hidden.to(weight.dtype), weight, bias).float(), labels, reduction="sum")


def output_head(model) -> nn.Module:
    return _owner(model).lm_head


def make_loss(head: nn.Module):
    """A Trainer `compute_loss_func` for a model whose `head` is swapped out by `install` during forward."""

    def loss(outputs, labels, num_items_in_batch=None):
        hidden = outputs.logits[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE
        hidden, targets = hidden[keep], targets[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            end = start + CHUNK_TOKENS
            total = total + checkpoint(_chunk_loss, hidden[start:end], head.weight, head.bias, targets[start:end],
                                       use_reentrant=False)
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return total / torch.as_tensor(count, device=total.device).clamp(min=1)

    return loss
