"""QLoRA's quantized base: bitsandbytes 4-bit (NF4/FP4) or 8-bit, imported only when asked for."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import LorakitError
from ..recipe import QuantSettings, Recipe
from .manifest import Quantization


def require_bitsandbytes():
    """bitsandbytes, or a message that says what to install or change."""
    try:
        import bitsandbytes
    except ImportError:
        raise LorakitError("method: qlora needs bitsandbytes: pip install bitsandbytes "
                           "(or train with method: lora)") from None
    except Exception as exc:  # a broken CUDA set-up raises all sorts at import time
        raise LorakitError(f"bitsandbytes is installed but cannot load here ({exc}); reinstall it for this "
                           f"machine's CUDA, or train with method: lora") from None
    return bitsandbytes


def bnb_config(quantization: Quantization):
    """transformers' BitsAndBytesConfig for a recorded quantization."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # FSDP shards the 4-bit weights only when they are stored in the compute dtype, not in uint8.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.type,
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, quantization.storage))


def quantization_of(settings: QuantSettings, compute_dtype: torch.dtype) -> Quantization:
    """A recipe's quant settings as recorded in the manifest, so inference and merging load the same base."""
    return Quantization(bits=settings.bits, type=settings.type if settings.bits == 4 else "int8",
                        double_quant=settings.double_quant if settings.bits == 4 else False,
                        compute_dtype=str(compute_dtype).removeprefix("torch."))


def quantization_for(recipe: Recipe, dtype: torch.dtype) -> Quantization | None:
    """What a run's base is quantized as (None unless method: qlora)."""
    if recipe.method != "qlora":
        return None
    quantization = quantization_of(recipe.quant, dtype)
    if recipe.train.strategy == "fsdp" and recipe.quant.bits == 4:  # FSDP shards 4-bit weights stored in the dtype
        quantization = dataclasses.replace(quantization, storage=quantization.compute_dtype)
    return quantization


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPU.

    bitsandbytes >= 0.48 on a CPU with avx512_bf16 rewrites each Linear4bit weight into a CPU-only
    layout during its first forward pass in eval mode without gradients (an inference speed-up). After
    that, training fails ("a view of a leaf Variable ... in-place operation") and dequantize/merge
    read the repacked bytes as if they were the original and produce wrong weights. Every quantized
    load in lorakit goes through here, so an evaluation, a generation or a probe can come before
    training or merging safely (tests/test_qlora_full.py runs that sequence).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def upcast_unquantized(model) -> None:
    """Hold the parameters bitsandbytes left unquantized (embeddings, norms) in fp32, as peft's k-bit
    preparation does for training, on every quantized load: an adapter then runs at inference with
    the numerics it was trained with (measured: an 8-bit adapter reloaded with bf16 norms moved the
    logits by 0.23 on the Qwen2-0.5B shape, beyond the reload check's limit)."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
