"""Tool-calling conversations: a record's `tools` (OpenAI's function schema) and its messages' tool calls and
tool results, checked and put in the one form every chat template reads.

The forms read are OpenAI's (an assistant message's `tool_calls`, each {"id", "type": "function",
"function": {"name", "arguments"}} with arguments as an object or a JSON string, and `tool` messages) and
ShareGPT's `function_call` / `observation` turns with `tools` as a JSON string, as LLaMA-Factory reads them.
The form rendered: tools as [{"type": "function", "function": {...}}], a call's arguments as an object
(Qwen2.5's and Llama 3.1's templates write `arguments | tojson`: a JSON string would be written twice
quoted), an assistant message's content a string even beside calls (Qwen3's template reads it), and a
tool result a string. The loss covers the assistant's turns, calls included, never a tool's result: only
assistant turns are trained (template.rendered_examples).
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from ..errors import LorakitError

TOOL = "tool"
PROBE_TOOL = "PROBE_TOOL"
PROBE_TOOLS = [{"type": "function", "function": {"name": PROBE_TOOL, "description": "PROBE-DESCRIPTION",
                                                 "parameters": {"type": "object", "properties": {}}}}]
"""A tool the templates are asked to render, to read what they do with tools (renders_tools,
inference/toolcalls.call_format)."""
_RENDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checked_tools(value: Any, where: str) -> list[dict] | None:
    """The record's tools in OpenAI's form, or None where it has none (an empty list is none: Llama 3.1's
    template would announce an empty tool environment)."""
    if value is None:
        return None
    if isinstance(value, str):  # LLaMA-Factory writes the list as a JSON string
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{where}: field `tools` is a string that is not JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise LorakitError(f"{where}: field `tools` must be a list of functions")
    tools, names = [], set()
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise LorakitError(f"{where}: tools[{i}] must be a function with a `name` "
                               f'({{"type": "function", "function": {{"name": ..., "parameters": ...}}}})')
        if function["name"] in names:
            raise LorakitError(f"{where}: tools[{i}] names {function['name']!r} a second time")
        names.add(function["name"])
        tools.append({"type": "function", "function": function})
    return tools or None


def tool_names(tools: list[dict] | None) -> set[str]:
    return {tool["function"]["name"] for tool in tools or ()}


def checked_calls(calls: Any, where: str, field: str, tools: list[dict] | None) -> list[dict]:
    """An assistant message's tool calls, each {"type": "function", "function": {"name", "arguments": object}}
    (and its id, where given), each naming a tool of the record's list."""
    if not isinstance(calls, list) or not calls:
        raise LorakitError(f"{where}: {field} must be a non-empty list of calls")
    names, checked = tool_names(tools), []
    for i, call in enumerate(calls):
        here = f"{field}[{i}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise LorakitError(f"{where}: {here} must be a call with a function `name` and `arguments`")
        name = function["name"]
        if name not in names:
            listed = f"the record's tools are {', '.join(sorted(names))}" if names else "the record has no `tools` list"
            raise LorakitError(f"{where}: {here} calls {name!r}, which is not a tool of the record ({listed})")
        checked.append({"type": "function", "function": {"name": name, "arguments": arguments(
            function.get("arguments"), where, f"{here}.arguments")}})
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            checked[-1]["id"] = call["id"]
    return checked


def arguments(value: Any, where: str, field: str) -> dict:
    """A call's arguments as an object: given as one, or as a JSON string of one (OpenAI's wire form)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{where}: {field} is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{where}: {field} must be a JSON object of the arguments, got {type(value).__name__}")
    return value


def tool_result(content: Any, where: str, field: str) -> str:
    """A tool's result as the text the template writes (an object or a list as its JSON)."""
    if isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise LorakitError(f"{where}: {field} must be the tool's result as a string")
    return content


def sharegpt_calls(value: Any, where: str, i: int) -> list:
    """A ShareGPT `function_call` turn's value: one call or a list of them, as JSON text."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{where}: conversations[{i}].value (a function_call) is not JSON ({exc.msg})") from None
    return calls if isinstance(calls, list) else [calls]


def check_order(messages: list[dict], where: str) -> None:
    """Every tool result answers a call made before it."""
    calling = False
    for i, message in enumerate(messages):
        if message["role"] == TOOL and not calling:
            raise LorakitError(f"{where}: messages[{i}] is a tool result with no assistant tool call before it")
        calling = (message["role"] == TOOL and calling) or bool(message.get("tool_calls"))


def renders_tools(tokenizer) -> bool:
    """The chat template writes a conversation's tools into the prompt (Qwen2.5, Qwen3, Llama 3.1+ do; Qwen2,
    Llama 3.0 and Gemma 3 do not), read once per tokenizer."""
    from .specials import once_per_tokenizer
    from .template import render

    def probe(tokenizer) -> bool:
        try:
            return "PROBE-DESCRIPTION" in render(tokenizer, [{"role": "user", "content": "PROBE"}], tools=PROBE_TOOLS)
        except Exception:  # noqa: BLE001  (a template that fails on tools renders none)
            return False

    return once_per_tokenizer(_RENDERS, tokenizer, probe)


def written_texts(messages: list[dict]) -> list[str]:
    """What a conversation's messages give the template to write, in order: each content, and each call's
    arguments as the templates' `tojson` writes them. specials.encode_rendered keeps all of it text: an
    argument spelling <|im_end|> must not close a turn in training or in a served prompt."""
    return [text for m in messages for text in [m["content"], *map(written_arguments, m.get("tool_calls", ()))]]


def written_arguments(call: dict) -> str:
    """A checked call's arguments as the templates' `tojson` writes them (transformers' filter: json.dumps)."""
    return json.dumps(call["function"]["arguments"], ensure_ascii=False)
