"""Proof that what was written is what was trained: logits on a probe batch, before and after reload.

A silently broken adapter (wrong target modules saved, a quantized base that reloads differently, a
parent applied in the wrong order, weights cast on the way out) shows up here as a logit difference
the size of the adapter's whole effect, long before a user notices odd answers.
"""

from __future__ import annotations

import torch

from ..errors import LorakitError

PROBE_TOKENS = 64
PROBE_TEXT = ["The quick brown fox jumps over the lazy dog. 你好，世界。", "Hello, how are you today?"]


# Largest logit difference accepted, relative to the largest logit: fp32 is exact up to summation
# order; half precision rounds every weight (bf16 keeps 8 bits of mantissa, fp16 11).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def tolerance(dtype: torch.dtype, expected: torch.Tensor) -> float:
    return RELATIVE_TOLERANCE[dtype] * max(1.0, expected.abs().max().item())


def probe_ids(rows) -> torch.Tensor:
    """The first tokens of the first training row: text the model has seen, in the layout it trained on
    (rows: a list, a Dataset or a stream of rows)."""
    first = rows[0] if hasattr(rows, "__getitem__") and not hasattr(rows, "_ex_iterable") else next(iter(rows))
    return torch.tensor([first["input_ids"][:PROBE_TOKENS]])


def text_probe(tokenizer) -> torch.Tensor:
    """A fixed two-row probe (English and Chinese) for checks that have no training rows at hand."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXT]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    return out


def require_same_logits(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype, what: str) -> dict:
    """Raise when `actual` differs from `expected` beyond the dtype's tolerance; else report the figure."""
    diff = (expected - actual).abs().max().item()
    limit = tolerance(dtype, expected)
    if not diff <= limit:  # also catches NaN
        raise LorakitError(f"{what}: logits differ by {diff:.3g} from the trained model (limit {limit:g}); "
                           f"the written weights are not what was trained, so they were not kept")
    return {"max_logit_diff": diff, "tolerance": limit, "probe_tokens": int(expected.shape[1])}
