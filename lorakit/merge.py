"""Folding adapters into their base: the weights they were trained against, never re-quantized."""

from __future__ import annotations

from .adapters import base_of, check_base, expand_chain, is_full_model, read_manifest, trained_quantization
from .errors import LorakitError
from .modeling import apply_adapter, load_model, load_tokenizer


def merged_model(adapters, device: str, dtype, onto: str = "trained", model: str | None = None,
                 force: bool = False):
    """The base with the adapter chain merged in, as a plain transformers model (and its tokenizer).

    A QLoRA adapter was trained against the dequantized 4/8-bit weights, so by default it is merged
    onto exactly those (`onto="trained"`): dequantized in `dtype`, then merged. Merging straight into
    the quantized model would re-quantize the sum (logits move by about 0.05); `onto="original"`
    merges onto the unquantized base weights instead.
    """
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    if len(adapters) == 1 and is_full_model(adapters[0]):
        name = adapters[0]
        return load_model(name, dtype, device), load_tokenizer(name)
    if any(is_full_model(a) for a in adapters):
        raise LorakitError("a complete model folder cannot be chained with adapters; pass it as --model")
    manifests = [read_manifest(a) or {} for a in adapters]
    quantization = trained_quantization(manifests) if onto == "trained" else None
    name = model or base_of(adapters[0])
    tokenizer = load_tokenizer(name)
    base = load_model(name, dtype, device, quantization=quantization)
    for adapter, manifest in zip(adapters, manifests):
        check_base(adapter, manifest or None, base, tokenizer, name, force)
    if quantization:
        base = base.dequantize(dtype=dtype)
    for folder in expand_chain(adapters):
        base = apply_adapter(base, folder, merge=True)
    return base.eval(), tokenizer
