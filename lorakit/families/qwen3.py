"""Qwen3: Qwen2's layout without biases, with q/k norms; ChatML, with a thinking block the template writes
(read from the template: data/template.reasoning_block)."""

from __future__ import annotations

from .family import Family
from .qwen2 import CHATML_TOOLS

FAMILY = Family(name="Qwen3", model_types=("qwen3",), checkpoints="Qwen3 (base and instruct)",
                gguf_arch="qwen3", gguf_pre="qwen2", ollama_template=CHATML_TOOLS, vllm_reasoning_parser="qwen3",
                vllm_tool_parser="hermes")
