"""GGUF files for llama.cpp and Ollama: a merged model, or a LoRA adapter that one base GGUF takes beside
others, each with an Ollama Modelfile.

Written with the `gguf` package (llama.cpp's own Python writer and quantizers), with the tensor names
and metadata llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py give Qwen2: llama.cpp's
names from gguf.TensorNameMap, the byte-level BPE vocabulary as "gpt2" with Qwen2's pre-tokenizer, the
merges, special tokens and chat template read by gguf.SpecialVocab, and the end-of-turn token as the
stop. Lorakit writes the file itself rather than running llama.cpp's converter: that script is not
installed by any package and pulls the whole llama.cpp tree; the writer is.

Quantizations the `gguf` package produces in Python: f32, f16, bf16, q8_0. The k-quants (q4_k_m, ...)
come from llama.cpp's `llama-quantize`, run on the f16 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import LorakitError
from ..log import say

QUANTS = ("f32", "f16", "bf16", "q8_0")
ELSEWHERE = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs")
BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values
# Qwen2's ChatML in Ollama's template language. Ollama joins every system message into .System and keeps
# them in .Messages too (its template.go `collate`), so the turns skip them, as Ollama's own templates do.
CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}{{- end }}<|im_start|>assistant\n")


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


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise LorakitError(f"{folder}: GGUF export is written for Qwen2 models; this is {config.get('model_type')}")
    return config


def write_model(folder: Path, out: Path, quant: str, chat: bool, name: str | None = None) -> dict:
    """A merged (or fully fine-tuned) model folder as one GGUF file (general.name: `name`, else the
    folder's); returns what is recorded."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    gguf = _gguf()
    config = _config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_name(name or folder.name)
    _hyperparameters(writer, gguf, config, quant)
    _vocabulary(writer, gguf, folder, tokenizer, config, chat)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    sources: dict[str, tuple[Path, str]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118  (safe_open is not iterable)
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reads the output head from token_embd when there is none
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise LorakitError(f"{file}: tensor {name} has no llama.cpp name for Qwen2")
                _add(writer, gguf, target, tensors.get_tensor(name).to(torch.float32).numpy(), quant)
                sources[target] = (file, name)
    _write(writer)
    return {"tensors": len(sources), "quant": quant, "size_bytes": out.stat().st_size, "sources": sources}


def write_adapter(folder: Path, base_config: dict, out: Path) -> dict:
    """A plain peft LoRA adapter (one, flattened) as llama.cpp's LoRA GGUF: A and B of each module under
    the base tensor's llama.cpp name, alpha recorded (llama.cpp scales by alpha / r)."""
    from safetensors.torch import load_file

    gguf = _gguf()
    adapter = json.loads((folder / "adapter_config.json").read_text())
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter["lora_alpha"]))
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, base_config["num_hidden_layers"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    sources: dict[str, tuple[Path, str]] = {}
    for name, tensor in sorted(weights.items()):
        part = ".lora_a" if ".lora_A." in name else ".lora_b" if ".lora_B." in name else None
        if part is None:
            raise LorakitError(f"{folder}: {name} is not a LoRA A or B matrix; llama.cpp adapters hold only those")
        module = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        target = names.get_name(module, try_suffixes=(".weight",))
        if target is None:
            raise LorakitError(f"{folder}: {module} has no llama.cpp name for Qwen2")
        writer.add_tensor(target + part, tensor.float().numpy())
        sources[target + part] = (folder / "adapter_model.safetensors", name)
    _write(writer)
    return {"tensors": len(sources), "rank": adapter["r"], "alpha": adapter["lora_alpha"],
            "size_bytes": out.stat().st_size, "sources": sources, "quant": "f32"}


def _hyperparameters(writer, gguf, config: dict, quant: str) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(float((config.get("rope_parameters") or {}).get("rope_theta")
                                    or config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def _vocabulary(writer, gguf, folder: Path, tokenizer, config: dict, chat: bool) -> None:
    """Byte-level BPE as llama.cpp reads it ("gpt2" with Qwen2's pre-tokenizer), every id up to the
    model's vocab_size (the unused ones as padding), special tokens as CONTROL."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(config["vocab_size"]):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            kinds.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    if chat and "<|im_end|>" in tokenizer.get_vocab():
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))


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


def check_file(path: Path, sources: dict[str, tuple[Path, str]], quant: str) -> float:
    """Read the written file back (gguf.GGUFReader) and compare every tensor with its source, dequantized;
    returns the largest difference relative to the tensor's largest value, raising beyond what the
    quantization allows. The sources are read one tensor at a time."""
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
    for target, (file, name) in sources.items():
        with safe_open(str(file), framework="pt") as tensors:
            reference = tensors.get_tensor(name).to(torch.float32).numpy()
        tensor = found[target]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
        scale = max(float(np.abs(reference).max()), 1e-6)
        worst = max(worst, float(np.abs(data.astype(np.float32) - reference).max()) / scale)
    if worst > allowed:
        raise LorakitError(f"{path}: a tensor read back differs from its source by {worst:.3g} of its largest value "
                           f"(limit for {quant}: {allowed:g}); nothing was kept")
    return worst


def modelfile(source: str, adapter: str | None, system: str | None, chat: bool) -> str:
    """An Ollama Modelfile: FROM (the model GGUF, or the base GGUF under an ADAPTER), the chat template in
    Ollama's template language (ChatML), the recorded system prompt, the stop tokens (a chat model's
    end-of-turn, and EOS)."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if chat:
        lines.append(f'TEMPLATE """{CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    stops = ["<|im_end|>", "<|endoftext|>"] if chat else ["<|endoftext|>"]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """The Modelfile's instructions as Ollama reads them (name -> values; a triple-quoted value may span
    lines, a quoted one loses its quotes), for the tests and for anyone checking a file lorakit wrote."""
    found: dict[str, list[str]] = {}
    lines, i = text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if value.startswith('"""'):
            value = value[3:]
            while not value.endswith('"""'):
                value += "\n" + lines[i]
                i += 1
            value = value[:-3]
        elif len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found.setdefault(name.upper(), []).append(value)
    return found


def announce(path: Path, facts: dict) -> None:
    say(f"wrote {path} ({facts['tensors']} tensors, {facts['size_bytes'] / 2**20:.1f} MiB"
        + (f", {facts['quant']}" if "quant" in facts else "") + ")")
