"""Ollama's Modelfile for a GGUF export: FROM (and ADAPTER), the family's chat template in Ollama's template
language, the recorded system prompt, the stop tokens; and reading one back."""

from __future__ import annotations

from ..families import Family


def modelfile(source: str, adapter: str | None, system: str | None, chat: bool, family: Family, stops: list[str],
              no_thinking: str = "", chat_template: str | None = None) -> str:
    """An Ollama Modelfile: FROM (the model GGUF, or the base GGUF under an ADAPTER), the chat template in
    Ollama's template language (the family's; `no_thinking`: the empty reasoning block a prompt ends in when
    the adapter was trained with thinking off), the recorded system prompt, the stop tokens (a chat model's
    end of turn, and EOS)."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if chat:
        lines.append(f'TEMPLATE """{family.ollama(chat_template)}{no_thinking}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
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


