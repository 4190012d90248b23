"""Qwen2 and Qwen2.5 (one architecture: q/k/v biases, ChatML)."""

from __future__ import annotations

from .family import Family

# ChatML in Ollama's template language. Ollama joins every system message into .System and keeps them in
# .Messages too (its template.go `collate`), so the turns skip them, as Ollama's own templates do.
CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}{{- end }}<|im_start|>assistant\n")

# The same with the tools Qwen2.5's and Qwen3's templates render (Ollama's .Tools, .ToolCalls and tool turns), in
# their words; Ollama writes JSON compactly where the templates write `tojson`'s spaces.
CHATML_TOOLS = (
    "{{- if .Tools }}<|im_start|>system\n{{ if .System }}{{ .System }}\n\n{{ end }}# Tools\n\nYou may call one or more "
    "functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\n<tools>{{ range .Tools }}\n{{ json . }}{{ end }}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{{ else if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant{{ if .ToolCalls }}{{ if .Content }}\n{{ .Content }}"
    "{{ end }}{{ range .ToolCalls }}\n<tool_call>\n{\"name\": \"{{ .Function.Name }}\", \"arguments\": "
    "{{ json .Function.Arguments }}}\n</tool_call>{{ end }}{{ else }}\n{{ .Content }}{{ end }}<|im_end|>\n"
    "{{ else if eq .Role \"tool\" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n</tool_response><|im_end|>\n"
    "{{ end }}{{- end }}<|im_start|>assistant\n")

FAMILY = Family(name="Qwen2", model_types=("qwen2",), checkpoints="Qwen2, Qwen2.5 (base and instruct)",
                gguf_arch="qwen2", gguf_pre="qwen2", ollama_template=CHATML,
                ollama_variants=(("<tool_call>", CHATML_TOOLS),), vllm_tool_parser="hermes")
