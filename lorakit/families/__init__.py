"""What lorakit knows about each model family, in one place: the registry of families lorakit is tested
on, keyed by the config's `model_type`.

Everything that can be read from the model itself (the end of a turn, the pad and BOS tokens, roles,
where assistant turns sit in a rendering) is read from its tokenizer and chat template
(data/template.py), never named here. A family module holds only what cannot be read that way: the
architecture and tensor layout llama.cpp expects (gguf_arch, vocabulary kind, q/k permutation, norm
shift, extra metadata), its chat template in Ollama's template language, and its reasoning block.
Adding a family is one module here plus its tests (tests/test_families.py).
"""

from __future__ import annotations

from .family import Family, rope_of
from .gemma3 import FAMILY as GEMMA3
from .llama import FAMILY as LLAMA
from .qwen2 import FAMILY as QWEN2
from .qwen3 import FAMILY as QWEN3

FAMILIES: tuple[Family, ...] = (QWEN2, QWEN3, LLAMA, GEMMA3)
_BY_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

__all__ = ["FAMILIES", "Family", "rope_of", "family_of", "find"]


def find(model_type: str | None) -> Family | None:
    """The family of a config's model_type, or None for one lorakit has not been tested on."""
    return _BY_TYPE.get(model_type or "")


def family_of(config) -> Family | None:
    """The family of a transformers config (or config.json as a dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return find(model_type)
