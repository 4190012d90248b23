"""GGUF files for llama.cpp and Ollama: a merged model, or a LoRA adapter that one base GGUF takes beside
others, each with an Ollama Modelfile.

Written with the `gguf` package (llama.cpp's own Python writer and quantizers), with the tensor names
and metadata llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py give each family lorakit
knows (lorakit/families: architecture, q/k permutation, norm shift, extra metadata and tensors): llama.cpp's
names from gguf.TensorNameMap, the vocabulary (gguf_vocab.py), special tokens and chat template read by
gguf.SpecialVocab, and the end-of-turn token as the stop. Lorakit writes the file itself rather than running llama.cpp's converter: that script is not
installed by any package and pulls the whole llama.cpp tree; the writer is.

Quantizations the `gguf` package produces in Python: f32, f16, bf16, q8_0. The k-quants (q4_k_m, ...)
come from llama.cpp's `llama-quantize`, run on the f16 file.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import LorakitError
from ..families import FAMILIES, Family, family_of, rope_of
from ..log import say
from .gguf_vocab import write_vocabulary
from .modelfile import modelfile, parse_modelfile  # noqa: F401  (this module's API too)
from .variants import scale

QUANTS = ("f32", "f16", "bf16", "q8_0")
ELSEWHERE = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs")
BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


def check_quant(quant: str) -> None:
    if quant in ELSEWHERE:
        raise LorakitError(f"--quant {quant}: the gguf package cannot make it; export --quant f16 and run llama.cpp's "
                           f"llama-quantize model.gguf model-{quant}.gguf {quant.upper()}")
    if quant not in QUANTS:
        raise LorakitError(f"--quant {quant}: expected one of {', '.join(QUANTS)} (others: llama.cpp's llama-quantize)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LorakitError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _config(folder: Path) -> tuple[dict, Family]:
    config = json.loads((folder / "config.json").read_text())
    family = family_of(config)
    if family is None:
        known = ", ".join(sorted({t for f in FAMILIES for t in f.model_types}))
        raise LorakitError(f"{folder}: GGUF export knows the model types {known}; this is {config.get('model_type')}")
    for check in _REFUSALS:
        check(folder, config)
    return config, family


def _arch(gguf, family: Family):
    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == family.gguf_arch)


def _dims(config: dict) -> tuple[int, int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def _converted(family: Family, config: dict, name: str, tensor):
    """A transformers tensor as llama.cpp's converter writes it for the family: q/k rows permuted for the
    "llama" architecture, norms shifted where the model multiplies by 1 + weight."""
    heads, kv_heads, _ = _dims(config)
    if family.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        tensor = _permute(tensor, heads if ".q_proj." in name else kv_heads)
    if family.norm_shift and name.endswith("norm.weight"):
        tensor = tensor + family.norm_shift
    return tensor


def _permute(tensor, heads: int):
    """transformers rotates the two halves of each head; llama.cpp's "llama" rotates interleaved pairs."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_model(folder: Path, out: Path, quant: str, chat: bool, name: str | None = None) -> dict:
    """A merged (or fully fine-tuned) model folder as one GGUF file (general.name: `name`, else the
    folder's); returns what is recorded."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    gguf = _gguf()
    config, family = _config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(out), family.gguf_arch)
    writer.add_name(name or folder.name)
    _hyperparameters(writer, gguf, config, quant)
    if family.gguf_extra:
        family.gguf_extra(writer, config)
    write_vocabulary(writer, gguf, folder, tokenizer, config, family, chat)
    names = gguf.TensorNameMap(_arch(gguf, family), config["num_hidden_layers"])
    sources: dict[str, tuple] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118  (safe_open is not iterable)
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reads the output head from token_embd when there is none
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise LorakitError(f"{file}: tensor {key} has no llama.cpp name for {family.name}")
                convert = partial(_converted, family, config, key)
                _add(writer, gguf, target, convert(tensors.get_tensor(key).to(torch.float32)).numpy(), quant)
                sources[target] = (file, key, convert)
    for target, data in (family.gguf_tensors(config) if family.gguf_tensors else {}).items():
        writer.add_tensor(target, data)  # computed from the config (Llama 3.1's rope factors): nothing to compare
        sources[target] = (None, target, None)
    _write(writer)
    return {"tensors": len(sources), "quant": quant, "size_bytes": out.stat().st_size, "sources": sources}


def write_adapter(folder: Path, base_config: dict, out: Path) -> dict:
    """A plain peft LoRA adapter (one, flattened) as llama.cpp's LoRA GGUF: A and B of each module under
    the base tensor's llama.cpp name, alpha recorded (llama.cpp scales by alpha / r). Where the family's q/k
    rows are permuted, so are B's (A acts on the input, which keeps its order)."""
    from safetensors.torch import load_file

    gguf = _gguf()
    family = family_of(base_config)
    if family is None:
        raise LorakitError(f"{folder}: GGUF adapters are written for the families lorakit knows; its base is "
                           f"{base_config.get('model_type')}")
    adapter = json.loads((folder / "adapter_config.json").read_text())
    writer = gguf.GGUFWriter(str(out), family.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is carried as the alpha that gives it
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale(adapter) * adapter["r"])
    names = gguf.TensorNameMap(_arch(gguf, family), base_config["num_hidden_layers"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    sources: dict[str, tuple] = {}
    for key, tensor in sorted(weights.items()):
        part = ".lora_a" if ".lora_A." in key else ".lora_b" if ".lora_B." in key else None
        if part is None:
            raise LorakitError(f"{folder}: {key} is not a LoRA A or B matrix; llama.cpp adapters hold only those")
        module = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        target = names.get_name(module, try_suffixes=(".weight",))
        if target is None:
            raise LorakitError(f"{folder}: {module} has no llama.cpp name for {family.name}")
        convert = partial(_converted, family, base_config, module) if part == ".lora_b" else None
        writer.add_tensor(target + part, (convert(tensor.float()) if convert else tensor.float()).numpy())
        sources[target + part] = (folder / "adapter_model.safetensors", key, convert)
    _write(writer)
    return {"tensors": len(sources), "rank": adapter["r"], "alpha": scale(adapter) * adapter["r"],
            "size_bytes": out.stat().st_size, "sources": sources, "quant": "f32"}


def _hyperparameters(writer, gguf, config: dict, quant: str) -> None:
    rope = rope_of(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    heads, kv_heads, head_dim = _dims(config)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def _rope_scaling(folder: Path, config: dict) -> None:
    rope = rope_of(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    written = ("default", "llama3") if family_of(config).gguf_tensors else ("default",)
    if kind not in written and not (kind == "linear" and rope.get("factor", 1) == 1):
        raise LorakitError(f"{folder}: rope scaling {kind!r} is not written to GGUF by lorakit yet (llama.cpp's "
                           f"convert_hf_to_gguf.py writes it); export --format merged and convert that folder")


def _query_scale(folder: Path, config: dict) -> None:
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != _dims(config)[2]:
        raise LorakitError(f"{folder}: query_pre_attn_scalar {scalar} differs from head_dim; llama.cpp scales queries "
                           f"by head_dim, so the GGUF would answer otherwise")


_REFUSALS = (_rope_scaling, _query_scale)


def _add(writer, gguf, name: str, data: np.ndarray, quant: str) -> None:
    """Norms and biases stay f32 (as llama.cpp's converter keeps them); matrices take the quantization,
    q8_0 only where a row divides into its blocks of 32 (f16 otherwise)."""
    kind = quant if data.ndim > 1 else "f32"
    if kind == "q8_0" and data.shape[-1] % BLOCK:
        kind = "f16"
    if kind == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
        packed = gguf.quants.quantize(data.astype(np.float32), qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_file(path: Path, sources: dict[str, tuple], quant: str) -> float:
    """Read the written file back (gguf.GGUFReader) and compare every tensor with its source (file, name, and
    the conversion it went through), dequantized; returns the largest difference relative to the tensor's
    largest value, raising beyond what the quantization allows. The sources are read one tensor at a time."""
    import torch
    from safetensors import safe_open

    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    allowed = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[quant]
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(sources):
        missing, extra = sorted(set(sources) - set(found)), sorted(set(found) - set(sources))
        raise LorakitError(f"{path}: the written tensors differ from the source's (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); nothing was kept")
    worst = 0.0
    for target, (file, name, convert) in sources.items():
        if file is None:
            continue
        with safe_open(str(file), framework="pt") as tensors:
            reference = tensors.get_tensor(name).to(torch.float32)
        reference = (convert(reference) if convert else reference).numpy()
        tensor = found[target]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
        scale = max(float(np.abs(reference).max()), 1e-6)
        worst = max(worst, float(np.abs(data.astype(np.float32) - reference).max()) / scale)
    if worst > allowed:
        raise LorakitError(f"{path}: a tensor read back differs from its source by {worst:.3g} of its largest value "
                           f"(limit for {quant}: {allowed:g}); nothing was kept")
    return worst


def announce(path: Path, facts: dict) -> None:
    say(f"wrote {path} ({facts['tensors']} tensors, {facts['size_bytes'] / 2**20:.1f} MiB"
        + (f", {facts['quant']}" if "quant" in facts else "") + ")")
