"""Base model and tokenizer loading, device and dtype choice, LoRA attachment, base fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import LorakitError, first_line
from ..recipe import Recipe
from ..system.hub import hub_reachable
from .manifest import Quantization

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(setting: str = "auto") -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise LorakitError("train.device is cuda, but no CUDA GPU is visible; use device: auto or cpu")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (measured here: 2.3x the fp32 matmul peak)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """auto: bf16 on a GPU or CPU that runs it natively, fp16 on an older GPU, fp32 on other CPUs.

    On a CPU with native bf16, frozen base weights in bf16 with fp32 LoRA weights under bf16 autocast
    trained 1.7x faster than fp32 at 0.6x the memory (bench/RESULTS.md); elsewhere bf16 is emulated
    and slower, so fp32 stays.
    """
    if setting != "auto":
        if setting == "fp16" and device == "cpu":
            raise LorakitError("fp16 training needs a GPU; use dtype: bf16 or fp32 on a CPU")
        return DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Call a transformers loader, turning the usual failures into one line that names `name`."""
    local = Path(name).expanduser()
    if not local.exists() and _looks_local(name):
        raise LorakitError(f"{name}: model folder not found (looked at {local.resolve()})")
    if not local.exists():
        hub_reachable()  # offline at once when it is not
    if local.is_dir() and not (local / "config.json").is_file():
        raise LorakitError(f"{name}: not a model folder (no config.json)")
    try:
        return loader(str(local) if local.exists() else name, **kwargs)
    except OSError as exc:
        if local.exists():
            raise LorakitError(f"{name}: not a {what} folder ({first_line(exc)})") from None
        raise LorakitError(
            f"{name}: not a local folder (looked at {local.resolve()}), and the model hub could not be reached or "
            f"has no such model; "
            f"download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) "
            f"and set `model: DIR`") from None
    except ValueError as exc:
        raise LorakitError(f"{name}: cannot load as a {what} ({first_line(exc)})") from None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: it starts like one, has more parts than org/name, or its first part
    is a folder here (`models/qwen` beside a models/ folder is a missing download, not a hub repo)."""
    parts = Path(name).parts
    return name.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer",
                                 trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token(tokenizer)
    return tokenizer


def pad_token(tokenizer) -> str:
    """A pad token for a tokenizer without one, from its own vocabulary (embeddings are never resized): a
    reserved padding token where it has one (Llama 3.1's <|finetune_right_pad_id|>), else EOS. Padding is
    masked out of attention and labels either way; a dedicated token keeps EOS out of the padding."""
    special = [t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values() if t.special]
    named = [t for t in special if "pad" in t.lower()] + [t for t in special if "reserved" in t.lower()]
    return named[0] if named else tokenizer.eos_token


def load_config(name: str, trust_remote_code: bool = False):
    """A model's config alone (no weights): what `lorakit plan` and the causal-LM check read."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, name, "model", trust_remote_code=trust_remote_code)


def check_causal_lm(name: str, trust_remote_code: bool = False) -> None:
    """Fail fast, before data and weights are loaded, on a model that cannot generate text."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = load_config(name, trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise LorakitError(f"{name}: not a causal language model (its model type is {config.model_type})")


def load_model(name: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False,
               quantization: Quantization | None = None):
    """A causal LM in `dtype` on `device`, in eval mode (training switches it).

    With `quantization` (as the manifest records it) the linear layers are loaded through
    bitsandbytes in 4 or 8 bits, and the CPU 4-bit repacking hazard is switched off.
    """
    from transformers import AutoModelForCausalLM

    extra = {}
    if quantization:
        from .quant import bnb_config

        extra = {"quantization_config": bnb_config(quantization), "device_map": {"": device}}
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, "causal language model",
                             dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if quantization:
        from .quant import keep_4bit_layout, upcast_unquantized

        keep_4bit_layout(model)
        upcast_unquantized(model)
        return model.eval()
    return model.to(device).eval()


def unwrap_peft(model):
    """The transformers model under peft's wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def for_training(model):
    """Switch off the KV cache for training. With a cache, transformers ignores packed position ids
    and lets packed examples attend to each other (measured: logits off by ~3 on the tiny model)."""
    model.config.use_cache = False
    return model


def fingerprint(config, tokenizer) -> str:
    """Identifies a base model by its architecture and vocabulary, not by where it was loaded from,
    so an adapter can tell a matching base on another machine from a different model."""
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                     "quantization_config", "architectures"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()[:16]


def make_trainable(model, recipe: Recipe, quantized: bool, token_ids: list[int] = ()):
    """full: every weight trains. lora/qlora: a fresh LoRA adapter (with the recipe's variants: weights/variants.py)
    on a frozen (maybe quantized) base; `token_ids`: lora.trainable_tokens as ids."""
    if recipe.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    return attach_lora(model, recipe.lora, recipe.train.seed, list(token_ids))


def attach_lora(model, settings, seed: int, token_ids: list[int] = ()):
    """Wrap `model` in a fresh trainable LoRA adapter (peft)."""
    from peft import get_peft_model

    from .variants import lora_config

    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora_config(settings, list(token_ids)))
    except ValueError as exc:
        raise LorakitError(f"lora.target {settings.target!r}: {first_line(exc)}") from None


def set_stop_tokens(model, tokenizer, chat: bool) -> str | None:
    """A chat model must stop at the token that closes its template's turns (<|im_end|>, <|eot_id|>,
    <end_of_turn>): written with a base model's EOS (<|endoftext|>, <|end_of_text|>), plain transformers and
    every runtime reading its generation config would never stop. Returns the end of turn, if it set one."""
    from ..data.template import end_of_turn

    end_token = end_of_turn(tokenizer) if chat else None
    if end_token is None or end_token not in tokenizer.get_vocab():
        return None
    end = tokenizer.convert_tokens_to_ids(end_token)
    eos = [end] + [i for i in [tokenizer.eos_token_id] if i is not None and i != end]
    model.config.eos_token_id = end
    model.generation_config.eos_token_id = eos
    tokenizer.eos_token = end_token
    return end_token


def release_memory() -> None:
    """Give freed memory back: the GPU cache, and on Linux the C heap's free pages (glibc keeps them
    otherwise, and the next load would stack on top of the last one in the peak)."""
    import gc

    from ..system.allocator import trim_heap

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting a 4-bit weight by its logical shape, not its packed bytes."""
    def count(p):
        state = getattr(p, "quant_state", None)
        return state.shape.numel() if state is not None else p.numel()

    return sum(count(p) for p in model.parameters() if p.requires_grad), sum(count(p) for p in model.parameters())


