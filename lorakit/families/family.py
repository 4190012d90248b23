"""The shape of a family module: what lorakit cannot read from a model's own files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def rope_of(config: dict) -> dict:
    """A config's rope settings: transformers 5's rope_parameters (Gemma 3: the global layers' set), or an
    older config's rope_scaling."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("full_attention", rope)


@dataclass(frozen=True)
class Family:
    name: str
    """As people say it: "Qwen3"."""
    model_types: tuple[str, ...]
    """transformers' config.model_type values of this family."""
    checkpoints: str
    """The checkpoints it covers, for messages and the README table."""
    gguf_arch: str
    """llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)."""
    ollama_template: str
    """The family's chat template in Ollama's template language (Go text/template)."""
    gguf_vocab: str = "gpt2"
    """llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte
    fallback, read from tokenizer.json)."""
    gguf_pre: str | None = None
    """llama.cpp's pre-tokenizer name for a "gpt2" vocabulary."""
    permute_qk: bool = False
    """llama.cpp's "llama" architecture rotates interleaved pairs where transformers rotates halves: the
    q and k projections' rows are permuted on the way out (as llama.cpp's converter does)."""
    norm_shift: float = 0.0
    """Added to every norm weight on the way out (Gemma's RMSNorm multiplies by 1 + weight)."""
    gguf_extra: Callable[[object, dict], None] | None = None
    """Writes the family's further llama.cpp metadata (writer, config)."""
    ollama_variants: tuple[tuple[str, str], ...] = ()
    """(text, template): where the checkpoint's own chat template holds `text`, Ollama's template is this one
    (Llama 3.1+'s system header differs from 3.0's)."""
    gguf_tensors: Callable[[dict], dict] | None = None
    """Tensors llama.cpp wants that the checkpoint computes on the fly (config -> {name: float32 array})."""
    vllm_reasoning_parser: str | None = None
    """vLLM's --reasoning-parser for the family's reasoning block (its reply's reasoning_content)."""
    vllm_tool_parser: str | None = None
    """vLLM's --tool-call-parser for the tool calls the family's templates write (a checkpoint whose template
    renders no tools, Qwen2-Instruct's, is served without one). lorakit's own server reads the format from
    the template (inference/toolcalls.py)."""

    def ollama(self, chat_template: str | None) -> str:
        """The family's template in Ollama's language for a checkpoint with this chat template."""
        return next((t for text, t in self.ollama_variants if text in (chat_template or "")), self.ollama_template)
