"""Llama 3.x (3.0, 3.1, 3.2, 3.3): header-id turns ending at <|eot_id|>; llama.cpp's "llama" architecture
rotates interleaved pairs (q and k are permuted on the way out) and reads Llama 3.1's rope scaling as a
tensor of per-frequency factors."""

from __future__ import annotations

import math

import numpy as np

from .family import Family, rope_of

LLAMA3 = ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
          "{{- range .Messages }}{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
          "{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


# Llama 3.1+ always opens with a system header naming the knowledge cut-off, as Ollama's own llama3.1/3.2
# templates do; their "Today Date" line (the day of rendering) is left out, as Ollama's templates leave it. The
# tools go into the first user turn and tool results are "ipython" turns, as the checkpoints' own template
# writes them (Ollama writes JSON compactly where that template indents it).
LLAMA31 = ("<|start_header_id|>system<|end_header_id|>\n\n{{ if .Tools }}Environment: ipython\n{{ end }}"
           "Cutting Knowledge Date: December 2023\n\n{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
           "{{- $first := true }}{{- range .Messages }}{{- if eq .Role \"user\" }}"
           "<|start_header_id|>user<|end_header_id|>\n\n{{ if and $first $.Tools }}Given the following functions, "
           "please respond with a JSON for a function call with its proper arguments that best answers the given "
           "prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of argument name "
           "and its value}.Do not use variables.\n\n{{ range $.Tools }}{{ json . }}\n\n{{ end }}{{ end }}"
           "{{ .Content }}<|eot_id|>{{ $first = false }}"
           "{{- else if eq .Role \"assistant\" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ if .ToolCalls }}"
           "{{ range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", \"parameters\": {{ json .Function.Arguments }}}"
           "{{ end }}{{ else }}{{ .Content }}{{ end }}<|eot_id|>"
           "{{- else if eq .Role \"tool\" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ json .Content }}<|eot_id|>"
           "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def rope_factors(config: dict) -> dict:
    """Llama 3.1's "llama3" rope scaling as llama.cpp's converter writes it (rope_freqs.weight): each rotary
    frequency's divisor, as transformers' _compute_llama3_parameters scales the frequencies."""
    rope = rope_of(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return {}
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    base = rope.get("rope_theta") or config.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.array(factors, dtype=np.float32)}


FAMILY = Family(name="Llama 3", model_types=("llama",), checkpoints="Llama 3.0, 3.1, 3.2 (base and instruct)",
                gguf_arch="llama", gguf_pre="llama-bpe", ollama_template=LLAMA3, permute_qk=True,
                ollama_variants=(("Cutting Knowledge Date", LLAMA31),),
                gguf_tensors=rope_factors, vllm_tool_parser="llama3_json")
