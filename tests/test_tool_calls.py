"""Agents: a family's tiny model (real tokenizer and chat template: Qwen2.5, Qwen3, Llama 3.1's format) trained
on a few tool-call conversations, then served by `lorakit serve` and asked through the official openai client:
it returns exactly the trained calls as OpenAI `tool_calls` (streamed too), and, given the tools' results, the
trained final answers; tool_choice forces a call or forbids one; the exports keep the template's tools."""

from __future__ import annotations

import json

import pytest
import torch
from families import CALLS, QA, TOOLS, tool_chat
from test_gguf import _isolated, _ollama_prompt, needs_go, needs_llama
from test_inference import _post, _running

pytestmark = pytest.mark.slow  # trains each family's model (shared with test_families)

NAMES = ["qwen2_5", "qwen3", "llama3_2"]


@pytest.fixture(scope="module", params=NAMES)
def served(request, family_trained):
    """The family's SFT adapter (taught QA and CALLS) behind lorakit's own server, with the official client."""
    from openai import OpenAI

    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    found = family_trained(request.param)
    session = Session(str(found["model"]), {"sft": str(found["sft"])}, "cpu", torch.float32)
    with _running(create_app(session)) as url:
        yield request.param, OpenAI(base_url=f"{url}/v1", api_key="unused"), url, found


def _ask(client, messages, **extra):
    return client.chat.completions.create(model="sft", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=60, **extra).choices[0]


def test_the_server_returns_exactly_the_trained_calls_and_then_the_trained_answers(served):
    name, client, _, _ = served
    for question, tool, arguments, result, answer in CALLS:
        choice = _ask(client, [{"role": "user", "content": question}])
        assert choice.finish_reason == "tool_calls", (name, choice)
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == tool and json.loads(call.function.arguments) == arguments
        # the call goes back as the client sends it, with the tool's result: the trained final answer
        back = [{"role": "user", "content": question}, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
        final = _ask(client, back)
        assert final.finish_reason == "stop" and final.message.tool_calls is None
        assert final.message.content == answer, (name, final)
    # a question the model answers itself stays an answer, tools offered or not
    assert _ask(client, [{"role": "user", "content": QA[0][0]}]).message.content == QA[0][1]


def test_calls_stream_as_the_openai_client_assembles_them(served):
    name, client, _, _ = served
    question, tool, arguments, *_ = CALLS[0]
    calls, content, finish = {}, "", None
    for chunk in client.chat.completions.create(model="sft", messages=[{"role": "user", "content": question}],
                                                tools=TOOLS, temperature=0, max_tokens=60, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = delta.id or entry["id"]
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0], (name, calls, content)
    assert calls[0]["name"] == tool and json.loads(calls[0]["arguments"]) == arguments and calls[0]["id"]


def test_tool_choice_forces_a_named_call_or_none(served):
    name, client, _, _ = served
    question = CALLS[1][0]
    forced = _ask(client, [{"role": "user", "content": question}],
                  tool_choice={"type": "function", "function": {"name": "book_slot"}})
    assert forced.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in forced.message.tool_calls] == \
        [("book_slot", CALLS[1][2])]
    # required: some call, the trained one
    required = _ask(client, [{"role": "user", "content": CALLS[0][0]}], tool_choice="required")
    assert required.message.tool_calls[0].function.name == "get_order"
    # none: the model is not offered the tools and its reply is text, never parsed into a call
    plain = _ask(client, [{"role": "user", "content": QA[1][0]}], tool_choice="none")
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None and plain.message.content == QA[1][1]


def test_bad_tool_requests_are_400s_naming_the_field(served):
    _, _, url, _ = served
    ask = {"model": "sft", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    status, body = _post(f"{url}/v1/chat/completions", {**ask, "tools": TOOLS,
                                                        "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert status == 400 and "'x' is not among the request's tools" in body["error"]["message"]
    history = tool_chat(*CALLS[0][:4])
    history[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    status, body = _post(f"{url}/v1/chat/completions", {**ask, "tools": TOOLS, "messages": history})
    assert status == 400 and "messages[1].tool_calls[0].arguments is not JSON" in body["error"]["message"]
    status, body = _post(f"{url}/v1/chat/completions", {**ask, "tool_choice": "required"})
    assert status == 400 and "no tools" in body["error"]["message"]
    # the untaught base, forced to call: what it writes is no call, and stays text (never a 500)
    status, body = _post(f"{url}/v1/chat/completions", {**ask, "model": "base", "max_tokens": 8, "tools": TOOLS,
                                                        "tool_choice": "required"})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert "tool_calls" not in body["choices"][0]["message"], body


def test_chat_shows_a_call_and_takes_the_typed_result(served, tmp_path):
    from click.testing import CliRunner

    from lorakit.cli import main

    name, _, _, found = served
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    question, tool, arguments, result, answer = CALLS[0]
    run = CliRunner().invoke(main, ["chat", "--adapter", str(found["sft"]), "--tools", str(tools), "--greedy"],
                             input=f"{question}\n{json.dumps(result)}\n\n")
    assert run.exit_code == 0, run.output
    assert 'assistant> -> get_order(order_id="A12")\nget_order result> ' in run.output, run.output
    assert f"assistant> {answer}" in run.output
    once = CliRunner().invoke(main, ["chat", "--adapter", str(found["sft"]), "--tools", str(tools), "--greedy",
                                     "--prompt", question])
    assert once.output.strip().splitlines()[-1] == '-> get_order(order_id="A12")', once.output


def _canonical(text: str) -> str:
    """`text` with every JSON object in it written one way (sorted keys, no spaces): Ollama writes JSON compactly
    where the templates write `tojson`'s spaces or indents."""
    out, position = [], 0
    while position < len(text):
        if text[position] == "{":
            try:
                value, end = json.JSONDecoder().raw_decode(text, position)
                out.append(json.dumps(value, sort_keys=True, separators=(",", ":")))
                position = end
                continue
            except json.JSONDecodeError:
                pass
        out.append(text[position])
        position += 1
    return "".join(out)


def _talk():
    """A conversation through a call and its result, as lorakit renders it (the call's arguments an object: a
    template writes a JSON string of them quoted), and the tokenizers of the base and of the merged export."""
    from lorakit.data.chat import checked_messages

    question, tool, arguments, result, _ = CALLS[0]
    return checked_messages([{"role": "system", "content": "Answer briefly."},
                             *tool_chat(question, tool, arguments, result)], "talk", "messages", answer=False,
                            tools=TOOLS)


def test_the_merged_export_keeps_the_tools_template(served):
    from transformers import AutoTokenizer

    _, _, _, found = served
    base, merged = AutoTokenizer.from_pretrained(found["model"]), AutoTokenizer.from_pretrained(found["merged"])
    talk = _talk()
    for messages in (talk, talk[:2]):
        assert merged.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True) == \
            base.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)


@needs_go
def test_the_modelfile_template_renders_tools_calls_and_results_in_ollamas_engine(served):
    """Ollama's engine renders the tools, the call and the result as the checkpoint's template does (up to the
    spacing and key order of the JSON, which Ollama writes compactly)."""
    import re

    from transformers import AutoTokenizer

    from lorakit.weights.gguf import parse_modelfile

    _, _, _, found = served
    base = AutoTokenizer.from_pretrained(found["model"])
    talk = _talk()
    template = parse_modelfile((found["gguf"] / "Modelfile").read_text())["TEMPLATE"][0]
    ours = [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls")} for m in talk]
    expected = base.apply_chat_template(talk, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    expected = re.sub(r"Today Date: \d\d \w\w\w \d{4}\n", "", expected)  # Ollama's Llama templates leave it out
    bos = base.bos_token or ""
    rendered = (bos if bos and expected.startswith(bos) else "") + _ollama_prompt(template, ours, TOOLS)
    assert "get_order" in rendered and "shipped" in rendered
    assert _canonical(rendered) == _canonical(expected), (rendered, expected)


@needs_llama
def test_llama_cpp_renders_the_ggufs_template_with_tools_and_writes_the_trained_call(served):
    from transformers import AutoTokenizer

    from lorakit.data.template import style_for
    from lorakit.inference.toolcalls import call_format

    _, _, _, found = served
    merged = AutoTokenizer.from_pretrained(found["merged"])
    question, tool, arguments, *_ = CALLS[0]
    chat_template, reply = _isolated("chat", str(found["gguf"] / "model.gguf"),
                                     [{"role": "user", "content": question}], 60, TOOLS)
    assert chat_template == merged.chat_template
    calls = call_format(merged, style_for(merged, "none")).parse(reply.split("</think>")[-1].strip(), {tool})
    assert calls == ("", [{"name": tool, "arguments": arguments}]), reply
