"""Tool calls in a reply: the family's call format read from its chat template, a reply's calls parsed into
OpenAI's `tool_calls`, and a call forced (tool_choice: a named function, or "required").

Nothing here names a family's tags. The template is asked to render a probe turn calling a probe tool;
what it writes around the call's JSON object is the format: Qwen2.5's and Qwen3's `<tool_call>\\n{"name":
..., "arguments": ...}\\n</tool_call>` (vLLM's "hermes" parser), Llama 3.1's bare `{"name": ...,
"parameters": ...}` ("llama3_json"). A reply is read as calls only when all of it after its text is calls
of the request's tools with JSON-object arguments; anything else stays text, as the model wrote it.
"""

from __future__ import annotations

import json
import uuid
import weakref
from dataclasses import dataclass

from ..data.specials import once_per_tokenizer
from ..data.template import PLAIN, Style, end_of_turn, render
from ..data.tools import PROBE_TOOL, PROBE_TOOLS, checked_tools, tool_names
from ..errors import LorakitError

PROBE_ARGUMENTS = {"PROBE_ARGUMENT": "PROBE-VALUE"}
_JSON = json.JSONDecoder()
_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
NO_TOOLS = ("tools: this model's chat template renders no tools or tool calls (Qwen2.5's, Qwen3's and Llama 3.1's "
            "do); it cannot be asked to call them")


@dataclass(frozen=True)
class CallFormat:
    """How the chat template writes a turn of tool calls."""

    lead: str
    """What such a turn opens with before the first call's name, as the template writes it last (Qwen3: the
    empty reasoning block, `<tool_call>\\n{"name": "`): a forced call's prompt goes on with it."""
    open: str
    """The tag before each call's JSON object (`<tool_call>`), "" where a call is the bare object."""
    close: str
    """The tag after it (`</tool_call>`), or ""."""
    name_key: str
    arguments_key: str
    """The object's keys for the function's name and its arguments ("arguments"; Llama 3.1: "parameters")."""

    def parse(self, text: str, names: set[str]) -> tuple[str, list[dict]] | None:
        """(text before the calls, [{"name", "arguments"}]) of a reply that ends in calls of `names`; None for
        a reply that is not one (it stays text)."""
        at = text.find(self.open) if self.open else len(text) - len(text.lstrip())
        if at < 0 or (not self.open and not text[at:].startswith("{")):
            return None
        content, position, calls = text[:at].rstrip(), at, []
        while position < len(text):
            if self.open:
                if not text.startswith(self.open, position):
                    return None
                position += len(self.open)
            try:
                call, position = _JSON.raw_decode(text, _skip(text, position))
            except json.JSONDecodeError:
                return None
            arguments = call.get(self.arguments_key, {}) if isinstance(call, dict) else None
            if isinstance(arguments, str):  # a model may write them as a JSON string, as OpenAI's wire does
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict) or call.get(self.name_key) not in names:
                return None
            calls.append({"name": call[self.name_key], "arguments": arguments})
            position = _skip(text, position)
            if self.close and text.startswith(self.close, position):
                position = _skip(text, position + len(self.close))
            elif not self.close and text.startswith(";", position):  # Llama 3.1 may chain calls with ";"
                position = _skip(text, position + 1)
            elif position < len(text):
                return None
        return content, calls

    def forced(self, name: str | None) -> str:
        """The start of the assistant's turn that makes it a call: of `name`, or (None) of some tool."""
        return self.lead + (name or "")


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def call_format(tokenizer, style: Style = PLAIN) -> CallFormat | None:
    """The template's format of tool calls, or None where it renders no tools or no calls (Qwen2-Instruct's,
    Gemma 3's, Llama 3.0's); read once per tokenizer and style (the server asks on every request)."""
    formats = once_per_tokenizer(_FORMATS, tokenizer, lambda _: {})
    if style not in formats:
        formats[style] = _probe_format(tokenizer, style)
    return formats[style]


def _probe_format(tokenizer, style: Style) -> CallFormat | None:
    call = {"type": "function", "function": {"name": PROBE_TOOL, "arguments": PROBE_ARGUMENTS}}
    question = [{"role": "user", "content": "PROBE-QUESTION"}]
    try:
        prompt = render(tokenizer, question, generation_prompt=True, style=style, tools=PROBE_TOOLS)
        upto = render(tokenizer, question + [{"role": "assistant", "content": "", "tool_calls": [call]}], style=style,
                      tools=PROBE_TOOLS)
    except Exception:  # noqa: BLE001  (a template that cannot render tools has no format)
        return None
    if "PROBE-DESCRIPTION" not in prompt or not upto.startswith(prompt) or PROBE_TOOL not in upto[len(prompt):]:
        return None
    written = upto[len(prompt):]
    named = written.find(PROBE_TOOL)
    start = written.rfind("{", 0, named)
    try:
        probe, end = _JSON.raw_decode(written, start)
    except (json.JSONDecodeError, ValueError):
        return None
    keys = {repr(value): key for key, value in probe.items()} if isinstance(probe, dict) else {}
    if repr(PROBE_TOOL) not in keys or repr(PROBE_ARGUMENTS) not in keys:
        return None
    eot = end_of_turn(tokenizer, style)
    reasoning = style.block.empty if style.block and written.startswith(style.block.empty) else ""
    return CallFormat(lead=written[:named], open=written[len(reasoning):start].strip(),
                      close=written[end: written.find(eot, end)].strip(), name_key=keys[repr(PROBE_TOOL)],
                      arguments_key=keys[repr(PROBE_ARGUMENTS)])


def text_of(content, where: str):
    """A message's content as text: OpenAI's list of text parts joined (newer clients send a tool's result so)."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise LorakitError(f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}})")
    return "".join(p["text"] for p in content)


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls as OpenAI's `tool_calls` (arguments as a JSON string, each with an id)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


class CallStream:
    """A reply's content arriving in pieces, with any calls at its end held back until the reply is whole
    (they are sent parsed, or as text where they do not parse)."""

    def __init__(self, format: CallFormat, names: set[str]):
        self.format, self.names, self.text, self.sent, self.holding = format, names, "", 0, False

    def feed(self, piece: str) -> str:
        """The content that can be sent now that `piece` has arrived."""
        self.text += piece
        if self.holding:
            return ""
        marker = self.format.open or "{"
        at = self.text.find(marker, self.sent) if self.format.open else (
            self.sent if self.text.strip().startswith("{") else -1)
        if at >= 0:
            self.holding = True
            cut = len(self.text[:at].rstrip())
        else:  # hold what may be the start of the marker, and trailing space (it may precede one)
            kept = self.text.rstrip()
            held = next((n for n in range(min(len(marker) - 1, len(kept)), 0, -1) if marker.startswith(kept[-n:])), 0)
            cut = len(kept[:len(kept) - held].rstrip()) if self.format.open or kept else self.sent
        out, self.sent = self.text[self.sent:max(cut, self.sent)], max(cut, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(content not yet sent, the calls or None) once the reply is whole."""
        parsed = self.format.parse(self.text, self.names)
        if parsed and parsed[1]:
            return parsed[0][self.sent:], parsed[1]
        return self.text[self.sent:], None


@dataclass(frozen=True)
class ToolUse:
    """What a chat request's `tools` and `tool_choice` ask of one reply."""

    listed: list[dict] | None
    """The request's tools, checked (its history's calls must name them)."""
    rendered: list[dict] | None
    """The tools the prompt offers (none with tool_choice "none")."""
    format: CallFormat | None = None
    """The reply is read for calls in this format (None: it is text)."""
    names: frozenset[str] = frozenset()
    """The tools a call may name (a forced one: that one)."""
    prefix: str = ""
    """The start of the turn a forced call gives the model."""
    single: bool = False
    """parallel_tool_calls false: a reply keeps its first call only."""

    def reply_calls(self, calls: list[dict]) -> list[dict]:
        """A reply's parsed calls as OpenAI's `tool_calls`, as many as the request allows."""
        return openai_calls(calls[:1] if self.single else calls)


def tool_use(tokenizer, style: Style, tools, choice, parallel: bool | None = None) -> ToolUse:
    """The request's tools, tool_choice (OpenAI's: "auto", "none", "required" or {"type": "function",
    "function": {"name"}}) and parallel_tool_calls for this template; LorakitError for what cannot be
    honoured."""
    listed = checked_tools(tools, "the request")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice not in (None, "auto", "none", "required") and not isinstance(named, str):
        raise LorakitError('tool_choice: expected "auto", "none", "required" or {"type": "function", "function": '
                           '{"name": ...}}')
    if listed is None or choice == "none":
        if choice not in (None, "auto", "none"):
            raise LorakitError("tool_choice: asks for a tool call, but the request has no tools")
        return ToolUse(listed, None)
    format = call_format(tokenizer, style)
    if format is None:
        raise LorakitError(NO_TOOLS)
    names = tool_names(listed)
    if named is not None and named not in names:
        raise LorakitError(f"tool_choice: {named!r} is not among the request's tools ({', '.join(sorted(names))})")
    prefix = format.forced(named) if named is not None or choice == "required" else ""
    return ToolUse(listed, listed, format, frozenset([named] if named else names), prefix, parallel is False)
