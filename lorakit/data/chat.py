"""Chat SFT data: records (messages, ShareGPT, Alpaca) -> checked messages -> template -> masked labels.

Labels cover what the model writes for each assistant turn: its content and the special token that
closes it (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), and a reasoning block
the template writes before the content; system and user turns and the turn headers are masked. The
spans come from the model's own chat template (template.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from ..errors import LorakitError
from .blocks import IGNORE, Example
from .files import RECORD_SUFFIXES, Record, check_unicode, data_files, read_records
from .specials import encode_rendered
from .template import (
    PLAIN,
    Style,
    end_of_turn,
    rendered_examples,
    with_bos,
    with_system,
)
from .tools import (
    TOOL,
    check_order,
    checked_calls,
    checked_tools,
    sharegpt_calls,
    tool_result,
    written_texts,
)

ROLES = ("system", "user", "assistant", TOOL)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "function_call": "assistant", "observation": TOOL, "tool": TOOL}


# The fields each recognised format has, all of which lorakit reads; any other field of a record is named
# in a note, so that nothing a user put in the data is dropped without a word.
READ = {"messages": {"messages", "tools"}, "sharegpt": {"conversations", "system", "tools"},
        "alpaca": {"instruction", "input", "output", "system", "history"}}
MESSAGE_READ = {"messages": {"role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name"},
                "sharegpt": {"from", "value"}}


class Conversations(NamedTuple):
    conversations: list[tuple[str, list[dict], list[dict] | None]]
    """(where, messages, tools) of every record, checked."""
    files: list[Path]
    notes: list[str]
    """Fields of the records that lorakit does not read, each named once per file with a count."""


def load_conversations(path: str | Path) -> Conversations:
    """(where, messages, tools) for every record under `path`, each checked."""
    files = data_files(path, RECORD_SUFFIXES)
    conversations, notes = [], []
    for file in files:
        unread: dict[str, list[str]] = {}
        for record in read_records(file):
            messages, tools, fields = to_messages(record)
            conversations.append((record.where, messages, tools))
            for name in fields:
                unread.setdefault(name, []).append(record.where)
        notes += [f"note: {file}: field `{name}` is not read by lorakit ({len(where)} record(s), first at "
                  f"{where[0].removeprefix(str(file)).strip()})" for name, where in unread.items()]
    if not conversations:
        raise LorakitError(f"{path}: no conversations found")
    return Conversations(conversations, files, notes)


def to_messages(record: Record) -> tuple[list[dict], list[dict] | None, list[str]]:
    """Detect the record's format; return checked messages, the tools they may call (None: no tools) and the
    fields lorakit did not read."""
    value, where = record.value, record.where
    if not isinstance(value, dict):
        raise LorakitError(f"{where}: expected an object with `messages`, got {type(value).__name__}")
    if "messages" in value:
        kind, messages, field = "messages", value["messages"], "messages"
    elif "conversations" in value:
        kind, messages, field = "sharegpt", _from_sharegpt(value, where), "conversations"
    elif "instruction" in value or "output" in value:
        kind, messages, field = "alpaca", _from_alpaca(value, where), "output"
    else:
        raise LorakitError(f"{where}: no `messages` field (nor ShareGPT `conversations` or Alpaca "
                           f"`instruction`/`output`)")
    unread = [name for name in value if name not in READ[kind]]
    turns = value.get(field) if kind in MESSAGE_READ else None
    if isinstance(turns, list):
        unread += sorted({f"{field}[].{name}" for turn in turns if isinstance(turn, dict) for name in turn
                          if name not in MESSAGE_READ[kind]})
    tools = checked_tools(value.get("tools"), where) if kind in ("messages", "sharegpt") else None
    return checked_messages(messages, where, field, tools=tools), tools, unread


def _from_sharegpt(value: dict, where: str) -> list[dict]:
    turns = value["conversations"]
    if not isinstance(turns, list):
        raise LorakitError(f"{where}: field `conversations` must be a list")
    messages = _system(value, where)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise LorakitError(f"{where}: conversations[{i}] has no `from` field")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise LorakitError(f"{where}: conversations[{i}].from is {turn['from']!r}; "
                               f"expected one of {', '.join(SHAREGPT_ROLES)}")
        if str(turn["from"]).lower() == "function_call":  # LLaMA-Factory: the calls as JSON text
            messages.append({"role": role, "content": "", "tool_calls": sharegpt_calls(turn.get("value"), where, i)})
        else:
            messages.append({"role": role, "content": turn.get("value")})
    return messages


def _from_alpaca(value: dict, where: str) -> list[dict]:
    """Alpaca as LLaMA-Factory reads it: `history` ([[instruction, answer], ...]) comes first, as earlier
    turns, and every answer is trained."""
    for key in ("instruction", "output"):
        if not isinstance(value.get(key), str):
            raise LorakitError(f"{where}: Alpaca field `{key}` must be a string")
    prompt = value["instruction"]
    if isinstance(value.get("input"), str) and value["input"].strip():
        prompt += "\n\n" + value["input"]
    messages = _system(value, where)
    history = value.get("history") or []
    if not isinstance(history, list):
        raise LorakitError(f"{where}: Alpaca field `history` must be a list of [instruction, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise LorakitError(f"{where}: history[{i}] must be a pair of strings [instruction, answer]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": value["output"]}]


def _system(value: dict, where: str) -> list[dict]:
    """A record's top-level `system` field (ShareGPT and Alpaca, as LLaMA-Factory writes them)."""
    if value.get("system") is None:
        return []
    if not isinstance(value["system"], str):
        raise LorakitError(f"{where}: field `system` must be a string")
    return [{"role": "system", "content": value["system"]}]


def checked_messages(messages: Any, where: str, field: str, answer: bool = True,
                     tools: list[dict] | None = None) -> list[dict]:
    """The messages, each a known role with string content (tools.py: an assistant's tool calls of `tools`, a
    tool's result after them); `answer`: there is an assistant turn to train on."""
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: field `{field}` must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LorakitError(f"{where}: messages[{i}] must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LorakitError(f"{where}: messages[{i}].role is {role!r}; expected system, user, assistant or tool")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and content is None:
            content = ""  # OpenAI's null content beside calls; templates read a string
        if role == TOOL:
            content = tool_result(content, where, f"messages[{i}].content")
        if not isinstance(content, str):
            raise LorakitError(f"{where}: messages[{i}].content must be a string, got "
                               f"{type(content).__name__ if content is not None else 'nothing'}")
        check_unicode(content, where, f"messages[{i}].content")
        checked.append({"role": role, "content": content})
        if calls is not None:
            checked[-1]["tool_calls"] = checked_calls(calls, where, f"messages[{i}].tool_calls", tools)
        if role == TOOL:
            checked[-1].update({k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)})
        reasoning = message.get("reasoning_content")
        if reasoning is not None and role == "assistant":
            if not isinstance(reasoning, str):
                raise LorakitError(f"{where}: messages[{i}].reasoning_content must be a string")
            check_unicode(reasoning, where, f"messages[{i}].reasoning_content")
            checked[-1]["reasoning_content"] = reasoning
    if answer and not any(m["role"] == "assistant" for m in checked):
        raise LorakitError(f"{where}: no assistant turn to train on")
    check_order(checked, where)
    return checked



def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, where: str,
                          style: Style = PLAIN, tools: list[dict] | None = None) -> list[Example]:
    """Token ids and labels of one conversation (one example, or more where the template renders an earlier
    turn otherwise once later turns follow: template.rendered_examples), each truncated to max_length."""
    examples, contents = [], written_texts(style.messages(messages))
    for text, spans in rendered_examples(tokenizer, messages, where, style, tools):
        ids, offsets = encode_rendered(tokenizer, text, contents, limit=max_length)
        labels = [t if any(s <= begin < e for s, e in spans) else IGNORE for t, (begin, _) in zip(ids, offsets)]
        lead = with_bos(tokenizer, ids)
        if len(lead) > len(ids):  # BOS the template did not write, as the tokenizer would lead with it
            ids, labels = lead[:max_length], ([IGNORE] + labels)[:max_length]
        examples.append(Example(ids, labels, where))
    return examples


def tokenize_conversations(conversations, tokenizer, max_length: int, system_prompt: str | None,
                           style: Style = PLAIN):
    """All conversations as examples, checked: each keeps a trained token, and end-of-turn is trained."""
    examples = [e for where, m, tools in conversations
                for e in tokenize_conversation(tokenizer, with_system(m, system_prompt), max_length, where, style, tools)]
    for example in examples:
        if all(label == IGNORE for label in example.labels):
            raise LorakitError(f"{example.where}: no assistant token is left after truncation to "
                               f"data.max_length={max_length}; raise max_length or shorten the conversation")
    eot = end_of_turn(tokenizer, style)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    cut = sum(eot_id not in e.labels for e in examples)
    if cut == len(examples):
        raise LorakitError(f"no example trains the end-of-turn token {eot}: the model would never learn to stop; "
                           f"raise data.max_length")
    return examples, cut
