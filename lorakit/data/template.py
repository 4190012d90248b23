"""What lorakit reads from a model's chat template: how a conversation renders, where each assistant turn
sits in that rendering, the token that closes a turn, the system prompt the template inserts by itself.

Nothing here names a family's tokens. An assistant turn is what the model writes after the prompt the
template gives it at inference: the text rendered with the generation prompt for the turns before it is
the prompt, and the conversation rendered up to and including the turn goes on with the turn's
reasoning block (if the template writes one), its content, and the special token right after the content
that closes it (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>): all of it trained.
A turn that the whole conversation renders exactly so is trained there. A template that renders an
earlier turn differently once later turns follow (Qwen3 drops the reasoning of turns before the last
question) gets that turn trained in an example of its own, rendered as the template renders it when it
is the last one. A template that appends the generation prompt even when not asked (Llama 3.0's) only
adds untrained text after the last turn. A template whose turns lorakit cannot find, or that does not
close a turn with a special token, is refused in one line, never trained with a guessed mask.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import LorakitError
from .specials import markers, once_per_tokenizer
from .tools import written_arguments

REASONING_MODES = ("keep", "empty", "none")
THINKING_SWITCH = "enable_thinking"
"""The template variable that turns a reasoning block off at inference, as Qwen3's, SmolLM3's and GLM's
templates name it and vLLM passes it (chat_template_kwargs)."""
_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Block(NamedTuple):
    """A reasoning ("thinking") block the template writes before an answer, read from the template."""

    open: str
    close: str
    empty: str
    """The block as the template writes it for a turn without reasoning (Qwen3: "<think>\\n\\n</think>\\n\\n")."""
    switch: str | None
    """The template variable that turns thinking off at inference, if the template has one."""


@dataclass(frozen=True)
class Style:
    """How conversations render beyond the template's defaults: what is kept of the family's reasoning block
    (data.reasoning), and the block itself (None: the family has none)."""

    reasoning: str = "keep"
    """keep: each turn's reasoning (a message's `reasoning_content`, or a <think> block opening its content),
    and for a turn without any, the block as the template writes it (Qwen3: empty); inference thinks.
    empty: every turn gets the empty block, the reasoning is dropped, and inference renders the prompt with
    thinking switched off (the template's own non-thinking mode). none: no block at all; inference thinks
    only if the model learnt to."""
    block: Block | None = None
    """The template's reasoning block (reasoning_block), None where it writes none."""

    def kwargs(self) -> dict:
        """The template variables this style sets (chat_template_kwargs, as vLLM calls them)."""
        return {self.block.switch: False} if self.block and self.block.switch and self.reasoning == "empty" else {}

    def messages(self, messages: list[dict]) -> list[dict]:
        """Messages as this style renders them: with keep, as they are; else without their reasoning."""
        if self.reasoning == "keep":
            return messages
        return [_without_reasoning(m, self.block) for m in messages]

    def finish(self, text: str) -> str:
        """A rendering as this style keeps it (none: the empty blocks the template wrote are taken out)."""
        return text.replace(self.block.empty, "") if self.block and self.reasoning == "none" else text


def _without_reasoning(message: dict, block) -> dict:
    if message.get("role") != "assistant":
        return message
    message = {k: v for k, v in message.items() if k != "reasoning_content"}
    content = message.get("content") or ""
    if block and block.close in content:
        message["content"] = content.split(block.close, 1)[1].lstrip("\n")
    return message


PLAIN = Style()


def style_for(tokenizer, reasoning: str = "keep") -> Style:
    """The style of data.reasoning for this tokenizer's template."""
    return Style(reasoning, reasoning_block(tokenizer))


def reasoning_block(tokenizer) -> Block | None:
    """The reasoning block the chat template writes before an assistant's answer, read by rendering a probe
    exchange with and without reasoning; None where it writes none (read once per tokenizer)."""
    return once_per_tokenizer(_BLOCKS, tokenizer, _probe_block)


def _probe_block(tokenizer) -> Block | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    question = [{"role": "user", "content": "PROBE-QUESTION"}]
    answer = {"role": "assistant", "content": "PROBE-ANSWER"}
    try:
        prompt = render(tokenizer, question, generation_prompt=True)
        plain = render(tokenizer, question + [answer])[len(prompt):]
        reasoned = render(tokenizer, question + [{**answer, "reasoning_content": "PROBE-REASONING"}])[len(prompt):]
        off = render(tokenizer, question, generation_prompt=True, **{THINKING_SWITCH: False})
    except Exception:  # noqa: BLE001  (a template that cannot render a plain exchange writes no block)
        return None
    empty = plain[: plain.find("PROBE-ANSWER")] if "PROBE-ANSWER" in plain else ""
    if not empty.strip() or "PROBE-REASONING" not in reasoned:
        return None
    before, _, after = reasoned.partition("PROBE-REASONING")
    block_open, block_close = before.strip(), after[: after.find("PROBE-ANSWER")].strip()
    if not (block_open and block_close and empty.strip().startswith(block_open)):
        return None
    return Block(block_open, block_close, empty, THINKING_SWITCH if off == prompt + empty else None)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False, style: Style = PLAIN,
           tools: list[dict] | None = None, **kwargs) -> str:
    """The conversation as the chat template writes it (with `tools`: the functions it may call, data/tools.py)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError("the tokenizer has no chat template; chat SFT and chat inference need one (an instruct "
                           "model's tokenizer carries it)")
    if tools:
        kwargs["tools"] = tools
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(style.messages(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt, **{**style.kwargs(), **kwargs})
    except TemplateError as exc:  # the template's own raise_exception (Llama 3.1: one tool call per turn)
        raise Refused(f"the chat template refuses the conversation: {exc}") from None
    return style.finish(text)


class Refused(LorakitError):
    """The chat template itself raised on a conversation (its message says why)."""


class Rendered(NamedTuple):
    """One training example of a conversation: its rendered text and the character spans that are trained."""

    text: str
    spans: list[tuple[int, int]]


def rendered_examples(tokenizer, messages: list[dict], where: str, style: Style = PLAIN,
                      tools: list[dict] | None = None) -> list[Rendered]:
    """The conversation as training examples: the whole rendering with every assistant turn it renders as the
    model writes it, and one example more for each turn it renders otherwise."""
    try:
        return _rendered_examples(tokenizer, messages, where, style, tools)
    except Refused as exc:
        raise LorakitError(f"{where}: {exc}") from None


def _rendered_examples(tokenizer, messages: list[dict], where: str, style: Style,
                       tools: list[dict] | None) -> list[Rendered]:
    whole = render(tokenizer, messages, style=style, tools=tools)
    found = _contents_in(whole, style.messages(messages), style)
    trained, apart = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True, style=style, tools=tools) if i else ""
        upto = render(tokenizer, messages[: i + 1], style=style, tools=tools)
        turn, content_at = _turn(tokenizer, upto, prompt, style.messages([message])[0], where, style)
        start = found[i] - content_at if found[i] is not None else -1
        if start >= 0 and whole.startswith(turn, start):
            trained.append((start, start + len(turn)))
        else:  # rendered otherwise in the whole conversation: trained as the last turn of its own example
            apart.append(Rendered(upto, [(len(prompt), len(prompt) + len(turn))]))
    return ([Rendered(whole, trained)] if trained else []) + apart


def _turn(tokenizer, upto: str, prompt: str, message: dict, where: str, style: Style) -> tuple[str, int]:
    """What the model writes for this turn, from the end of the prompt through the closing token, and where
    the message's content begins in it."""
    if not upto.startswith(prompt):
        raise LorakitError(f"{where}: the chat template renders the conversation before an assistant turn differently "
                           f"when the turn is added; lorakit cannot tell what to train (the template is not supported)")
    written = upto[len(prompt):]
    located = _find(written, message, 0, style)
    if located is None and message.get("tool_calls"):
        raise LorakitError(f"{where}: the chat template does not write the assistant's tool calls; it renders no tool "
                           f"calls (Qwen2.5's, Qwen3's and Llama 3.1's templates do)")
    if located is None:
        raise LorakitError(f"{where}: the chat template does not write an assistant message's content as given; "
                           f"lorakit cannot mask its loss")
    at, length = located
    if message.get("tool_calls"):
        return _calls_turn(tokenizer, written, message, at, where, style), at
    close = next((m for m in markers(tokenizer) if written.startswith(m, at + length)), None)
    if close is None:
        raise LorakitError(f"{where}: the chat template does not close an assistant turn with a special token right "
                           f"after its content; lorakit cannot mask its loss (nor tell the model where to stop)")
    return written[: at + length + len(close)], at


def _calls_turn(tokenizer, written: str, message: dict, position: int, where: str, style: Style) -> str:
    """A turn with tool calls: through each call (named in order after the content) and the end-of-turn token
    after the last (a call's own markers, Qwen's <tool_call>, lie in between)."""
    for call in message["tool_calls"]:
        at = written.find(call["function"]["name"], position)
        if at < 0:
            raise LorakitError(f"{where}: the chat template does not write the call to {call['function']['name']!r}; "
                               f"lorakit cannot mask its loss")
        position = at + len(call["function"]["name"])
        # past the arguments as `tojson` writes them, where it does: they may spell the end-of-turn token as text
        arguments = written_arguments(call)
        written_at = written.find(arguments, position)
        position = written_at + len(arguments) if written_at >= 0 else position
    end = end_of_turn(tokenizer, style)
    close = written.find(end, position)
    if close < 0:
        raise LorakitError(f"{where}: the chat template does not close a turn of tool calls with {end}; lorakit "
                           f"cannot mask its loss")
    return written[: close + len(end)]


def _find(text: str, message: dict, position: int, style: Style) -> tuple[int, int] | None:
    """(offset, length) of a message's content in `text` from `position`: as given, else as the template
    may have trimmed it, else without the reasoning block the template moved out of it (Qwen3's does); a
    turn of tool calls whose content the template leaves out (Llama 3.1's) or that has none, by its first
    call's name. An empty content without calls is found where the search starts."""
    content = message.get("content") or ""
    candidates = [content, content.strip()]
    if style.block and style.block.close in content:
        candidates.append(content.split(style.block.close, 1)[1].strip())
    candidates = [c for c in candidates if c]
    if message.get("tool_calls"):
        candidates.append(message["tool_calls"][0]["function"]["name"])
    elif not candidates:
        return position, 0
    for candidate in candidates:
        at = text.find(candidate, position)
        if at >= 0:
            return at, len(candidate)
    return None


def _contents_in(text: str, messages: list[dict], style: Style) -> list[int | None]:
    """Where each message's content begins in `text`, looked for in order; None for a content the rendering
    does not hold (a system prompt some templates drop)."""
    found, position = [], 0
    for message in messages:
        located = _find(text, message, position, style)
        found.append(located[0] if located else None)
        if located:
            position = located[0] + located[1]
    return found


def end_of_turn(tokenizer, style: Style = PLAIN) -> str:
    """The token that closes an assistant turn in the chat template (EOS for a tokenizer without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token
    probe = [{"role": "user", "content": "PROBE-QUESTION"}, {"role": "assistant", "content": "PROBE-ANSWER"}]
    try:
        turn, _ = _turn(tokenizer, render(tokenizer, probe, style=style),
                        render(tokenizer, probe[:1], generation_prompt=True, style=style), probe[1], "the chat template",
                        style)
    except Exception:  # noqa: BLE001  (a template that cannot render a plain exchange: no turns to close)
        return tokenizer.eos_token
    return next(m for m in markers(tokenizer) if turn.endswith(m))


def template_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template inserts by itself (Qwen2: "You are a helpful assistant.")."""
    probe = [{"role": "user", "content": "PROBE"}]
    marker = "SYSTEM-MARKER"
    bare = render(tokenizer, probe)
    head, found, tail = render(tokenizer, [{"role": "system", "content": marker}] + probe).partition(marker)
    if not found or not bare.startswith(head):
        return None
    end = bare.find(tail, len(head))
    return bare[len(head):end] or None if end >= 0 else None


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Insert the system prompt when the conversation has none, so training and inference agree."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` led by BOS where the tokenizer leads every text with it itself (Llama 3.1+, Gemma), once: a
    rendering whose template already wrote it keeps the one it has."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos) or not adds_bos(tokenizer):
        return ids
    return [bos] + ids


def adds_bos(tokenizer) -> bool:
    """The tokenizer leads every text with BOS itself (asked once per tokenizer: with_bos runs per document)."""
    def leads(tokenizer) -> bool:
        bos = tokenizer.bos_token_id
        return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]

    return once_per_tokenizer(_LEADS, tokenizer, leads)


def is_chat_model(tokenizer) -> bool:
    """An instruct model: its EOS is the token that closes its template's turns."""
    return bool(getattr(tokenizer, "chat_template", None)) and end_of_turn(tokenizer) == tokenizer.eos_token


def with_default_kwargs(tokenizer, style: Style) -> None:
    """Give the tokenizer's template this style's variables as defaults (a caller's own still win), so that
    every runtime reading the exported template (vLLM, llama.cpp, transformers) renders as lorakit does."""
    for name, value in style.kwargs().items():
        tokenizer.chat_template = (f"{{%- if {name} is not defined %}}{{%- set {name} = {str(value).lower()} %}}"
                                   f"{{%- endif %}}" + tokenizer.chat_template)


def template_check(tokenizer) -> str:
    """What lorakit checks of an untested family's chat template before training it: a two-turn probe's assistant
    turns are found and closed by one special token. Raises LorakitError where they are not."""
    probe = [{"role": "user", "content": "PROBE-Q1"}, {"role": "assistant", "content": "PROBE-A1"},
             {"role": "user", "content": "PROBE-Q2"}, {"role": "assistant", "content": "PROBE-A2"}]
    examples = rendered_examples(tokenizer, probe, "the chat template's probe")
    turns = [text[a:b] for text, spans in examples for a, b in spans]
    end = end_of_turn(tokenizer)
    if len(turns) != 2 or not all(t.endswith(end) and "PROBE-A" in t for t in turns):
        raise LorakitError(f"the chat template's assistant turns could not be masked exactly ({turns}); not trained")
    return f"its chat template's assistant turns are found and end at {end}"
