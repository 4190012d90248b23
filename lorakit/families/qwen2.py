"""Qwen2 and Qwen2.5 (one architecture: q/k/v biases, ChatML)."""

from __future__ import annotations

from .family import Family

# ChatML in Ollama's template language. Ollama joins every system message into .System and keeps them in
# .Messages too (its template.go `collate`), so the turns skip them, as Ollama's own templates do.
CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}{{- end }}<|im_start|>assistant\n")

FAMILY = Family(name="Qwen2", model_types=("qwen2",), checkpoints="Qwen2, Qwen2.5 (base and instruct)",
                gguf_arch="qwen2", gguf_pre="qwen2", ollama_template=CHATML,
                vllm_tool_parser="hermes")
