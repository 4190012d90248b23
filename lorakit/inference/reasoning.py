"""A reply's reasoning apart from its answer, as vLLM's reasoning parsers return it (`reasoning_content`
beside `content`), for templates with a reasoning block (data/template.reasoning_block)."""

from __future__ import annotations

from ..data.template import Block


def split(text: str, block: Block | None, thinking: bool = True) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply. `thinking`: the prompt left the block to the model (thinking on);
    with it off, the prompt closed an empty block already and the reply is all answer."""
    if block is None or not thinking:
        return None, text
    if block.close in text:
        reasoning, _, answer = text.partition(block.close)
        return reasoning.removeprefix(block.open.strip()).strip("\n") if reasoning.lstrip().startswith(
            block.open) else reasoning.strip("\n"), answer.lstrip("\n")
    if text.lstrip().startswith(block.open):  # cut off while still thinking
        return text.lstrip().removeprefix(block.open).strip("\n"), ""
    return None, text


class Splitter:
    """The same split for a reply that arrives in pieces (streaming): each piece's reasoning and answer parts.
    Text that may be the start of the closing tag is held until the next piece tells."""

    def __init__(self, block: Block | None, thinking: bool = True):
        self.block, self.thinking, self.text, self.sent = block, thinking, "", (0, 0)

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, answer delta) once `piece` has arrived."""
        self.text += piece
        text = self.text
        if not final and self.block is not None and self.thinking:
            tag = self.block.close
            held = next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)
            if held:
                text = text[:-held]
            if text.lstrip() and self.block.open.startswith(text.lstrip()):
                return "", ""  # the opening tag is still arriving
        reasoning, answer = split(text, self.block, self.thinking)
        reasoning = reasoning or ""
        out = reasoning[self.sent[0]:], answer[self.sent[1]:]
        self.sent = (max(self.sent[0], len(reasoning)), max(self.sent[1], len(answer)))
        return out
