"""Attention for packed training rows: each example attends causally within itself, through the
fused (flash) scaled-dot-product kernel.

transformers turns packed position ids into a block-diagonal 4D mask, and any explicit mask sends
PyTorch's scaled_dot_product_attention down its unfused path, which keeps every heads x seq x seq
score matrix for the backward pass (measured on the Qwen2-0.5B shape on CPU: most of a 16 GB peak
at batch 4 x 1024 tokens). The examples of a row are contiguous and their positions restart at 0, so
each one is a plain causal attention over its own slice: no mask, the fused kernel, no score matrix
kept. Registered through transformers' AttentionInterface; used only while training (generation keeps
the model's own attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "lorakit_packed"


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each example in a row: a new one begins wherever the position restarts at 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [positions.numel()]))


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [batch, heads, seq, dim]; key/value [batch, kv_heads, seq, dim]. Returns [batch, seq, heads, dim]."""
    # Grouped key/value heads go in as they are (enable_gqa), not copied out to every query head.
    options = {"dropout_p": dropout if module.training else 0.0, "is_causal": True, "scale": scaling,
               "enable_gqa": query.shape[1] != key.shape[1]}
    if kwargs.get("softcap"):  # Gemma 2's attention soft-capping: not in the fused kernel (Gemma 3 has none)
        raise NotImplementedError("lorakit's packed attention does not apply attention logit soft-capping")
    position_ids, window = kwargs.get("position_ids"), kwargs.get("sliding_window")
    if position_ids is None or query.shape[2] != key.shape[2]:
        return F.scaled_dot_product_attention(query, key, value, **options).transpose(1, 2).contiguous(), None
    positions = position_ids.expand(query.shape[0], -1)
    rows = []
    for b in range(query.shape[0]):
        # split, not slicing: its backward joins the pieces' gradients instead of adding zero-padded copies
        sizes = [e - s for s, e in _segments(positions[b])]
        pieces = zip(*(t[b:b + 1].split(sizes, dim=2) for t in (query, key, value)))
        rows.append(torch.cat([_attend(q, k, v, options, window) for q, k, v in pieces], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _attend(query, key, value, options: dict, window: int | None):
    """Causal attention over one example; a sliding-window layer (Gemma 3's) whose example is longer than its
    window sees only the last `window` tokens, through a banded mask (the unfused kernel, for those only)."""
    length = query.shape[2]
    if not window or length <= window:
        return F.scaled_dot_product_attention(query, key, value, **options)
    i = torch.arange(length, device=query.device)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=band, **{**options, "is_causal": False})


def _no_mask(*args, **kwargs):
    return None  # the segments come from the position ids


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, _no_mask)


def use_packed(model) -> str:
    """Switch a model to packed attention for training; returns the implementation to restore."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return previous


def restore(model, implementation: str) -> None:
    model.set_attn_implementation(implementation)
