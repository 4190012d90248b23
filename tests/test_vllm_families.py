"""`lorakit serve --engine vllm` for Qwen3 and Llama 3 (tiny models with their real tokenizers and templates):
vLLM answers as `lorakit serve` does, stops at the family's end of turn, and (Qwen3) returns the reasoning
apart from the answer, as lorakit's own server does; `chat_template_kwargs` reach the template in both; the
trained tool calls come back as OpenAI tool_calls from both."""

from __future__ import annotations

import json
import os

import pytest
import torch
from families import CALLS, QA, TOOLS, tool_chat
from test_inference import _post, _running
from test_vllm import VLLM, _serve_with_vllm, pytestmark  # noqa: F401  (slow, and skipped without vLLM)


@pytest.fixture(scope="module", params=["qwen3", "llama3_2"])
def served(request, family_trained, tmp_path_factory):
    """The family's tiny model (256 wide: vLLM's CPU attention wants 64-wide heads) with its SFT adapter
    (shared with test_families), behind vLLM and behind lorakit's own server."""
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    name = request.param
    found = family_trained(name)
    model, sft = found["model"], found["sft"]
    process, url = _serve_with_vllm(model, {"sft": sft}, tmp_path_factory.mktemp(f"vllm-{name}"))
    session = Session(str(model), {"sft": str(sft)}, "cpu", torch.float32)
    try:
        with _running(create_app(session)) as ours:
            yield name, url, ours
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)


def _message(url: str, question: str, **extra) -> dict:
    status, body = _post(f"{url}/v1/chat/completions", {"model": "sft", "temperature": 0, "max_tokens": 40,
                                                        "messages": [{"role": "user", "content": question}], **extra})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"  # stopped at the end of the turn, not at max_tokens
    return body["choices"][0]["message"]


def test_vllm_answers_as_lorakit_serve_and_stops_at_the_turn(served):
    name, vllm, ours = served
    for question, answer in QA:
        theirs, mine = _message(vllm, question), _message(ours, question)
        # vLLM's Qwen3 parser leaves the blank lines after </think> at the head of the answer; lorakit's does not
        assert mine["content"] == theirs["content"].lstrip("\n") == answer, (name, theirs, mine)
        if name == "qwen3":  # the (empty) reasoning apart from the answer, in both
            assert "reasoning_content" in mine and mine["reasoning_content"].strip() == \
                (theirs.get("reasoning_content") or theirs.get("reasoning") or "").strip(), (theirs, mine)


def test_chat_template_kwargs_reach_the_template_in_both_servers(served):
    """Thinking off: Qwen3's prompt closes an empty block itself and the reply is all answer; Llama 3's
    template has no such variable, and both servers answer as without it."""
    name, vllm, ours = served
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    theirs, mine = _message(vllm, QA[0][0], **off), _message(ours, QA[0][0], **off)
    assert theirs["content"].lstrip("\n") == mine["content"] == QA[0][1], (theirs, mine)
    assert "reasoning_content" not in mine


def test_vllm_returns_the_trained_tool_calls_and_answers_as_lorakit_serve_does(served):
    """`serve --engine vllm` starts vLLM with the family's tool parser (hermes, llama3_json): the same calls come
    back as OpenAI tool_calls from both servers, and after the tool's result, the same trained answer."""
    name, vllm, ours = served
    for question, tool, arguments, result, answer in CALLS:
        ask = {"model": "sft", "temperature": 0, "max_tokens": 60, "tools": TOOLS,
               "messages": [{"role": "user", "content": question}]}
        for url in (vllm, ours):
            status, body = _post(f"{url}/v1/chat/completions", ask)
            assert status == 200 and body["choices"][0]["finish_reason"] == "tool_calls", (name, url, body)
            calls = body["choices"][0]["message"]["tool_calls"]
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
                [(tool, arguments)], (name, url, body)
            status, body = _post(f"{url}/v1/chat/completions", {**ask, "messages": tool_chat(question, tool, arguments,
                                                                                             result)})
            assert status == 200 and body["choices"][0]["message"]["content"].lstrip("\n") == answer, (name, url, body)
