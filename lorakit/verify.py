"""Proof that what was written is what was trained: logits on a probe batch, before and after reload.

A silently broken adapter (wrong target modules saved, a quantized base that reloads differently, a
parent applied in the wrong order, weights cast on the way out) shows up here as a logit difference
the size of the adapter's whole effect, long before a user notices odd answers.
"""

from __future__ import annotations

import torch

from .errors import LorakitError

PROBE_TOKENS = 64


def tolerance(dtype: torch.dtype) -> float:
    """Largest logit difference accepted between two loads of the same weights."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def probe_ids(rows: list[dict]) -> torch.Tensor:
    """The first tokens of the first training row: text the model has seen, in the layout it trained on."""
    return torch.tensor([rows[0]["input_ids"][:PROBE_TOKENS]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    return out


def compare(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype, what: str) -> dict:
    """Raise when `actual` differs from `expected` beyond the dtype's tolerance; else report the figure."""
    diff = (expected - actual).abs().max().item()
    limit = tolerance(dtype)
    if not diff <= limit:  # also catches NaN
        raise LorakitError(f"{what}: logits differ by {diff:.3g} from the trained model (limit {limit:g}); "
                           f"the written weights are not what was trained, so nothing was kept")
    return {"max_logit_diff": diff, "tolerance": limit, "probe_tokens": int(expected.shape[1])}
