"""Folding adapters into their base: the weights they were trained against, never re-quantized."""

from __future__ import annotations

from .adapters import load_for_inference


def merged_model(adapters, device: str, dtype, onto: str = "trained", model: str | None = None,
                 force: bool = False):
    """The base with the adapter chain merged in, as a plain transformers model (and its tokenizer).

    A QLoRA adapter was trained against the dequantized 4/8-bit weights, so by default it is merged
    onto exactly those (`onto="trained"`): dequantized in `dtype`, then merged. Merging straight into
    the quantized model would re-quantize the sum (logits move by about 0.05); `onto="original"`
    merges onto the unquantized base weights instead.
    """
    lm, tokenizer, _ = load_for_inference(model, adapters, device, dtype, force, quantized=onto == "trained",
                                          merge=True)
    return lm, tokenizer
