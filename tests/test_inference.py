"""Adapters per domain at inference (swap, serve) and evidence that training helped (eval, compare)."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner
from conftest import (
    ANSWERS,
    DOMAIN_RECIPE,
    QUESTION,
    load_metrics,
    lorakit,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.slow  # every test here trains a model

def _specs(domains):
    return [f"{name}={path}" for name, path in domains.items()]


def test_chat_switches_adapters_in_one_process(domains, tiny_instruct):
    from lorakit.cli import main

    args = ["chat", "--model", str(tiny_instruct), "--greedy"]
    for spec in _specs(domains):
        args += ["--adapter", spec]
    script = f"/adapters\n{QUESTION}\n/reset\n/adapter violet\n{QUESTION}\n/reset\n/adapter none\n{QUESTION}\n/adapter nope\n\n"
    result = CliRunner().invoke(main, args, input=script)
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("assistant> ") for line in result.output.splitlines() if line.startswith("assistant> ")]
    assert replies[0] == ANSWERS["amber"] and replies[1] == ANSWERS["violet"]
    assert replies[2] not in ANSWERS.values()  # the bare base knows neither
    assert "*amber" in result.output and "using violet (" in result.output and "ms)" in result.output
    assert "no adapter named 'nope'" in result.output


def test_switching_adapters_in_chat_starts_a_new_conversation(domains, tiny_instruct):
    """The next adapter must not answer a history another adapter wrote."""
    from lorakit.cli import main

    args = ["chat", "--model", str(tiny_instruct), "--greedy"]
    for spec in _specs(domains):
        args += ["--adapter", spec]
    result = CliRunner().invoke(main, args, input=f"Hello there\n/adapter violet\n{QUESTION}\n\n")
    assert result.exit_code == 0, result.output
    assert "using violet (" in result.output and "; the conversation starts anew" in result.output
    replies = [line.removeprefix("assistant> ") for line in result.output.splitlines() if line.startswith("assistant> ")]
    assert replies == ["Hello from amber.", ANSWERS["violet"]]  # violet answers as in a fresh conversation


def test_a_stacked_cpt_and_sft_pair_is_one_named_entry(work, corpus, chats, tiny_base):
    """The parent + child entry (flattened into one adapter) equals the merged chain."""
    import torch

    from lorakit.inference.session import Session
    from lorakit.weights.folders import load_for_inference

    base = f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: {corpus}}}\ntrain: {{max_steps: 30, lr: 3.0e-3}}\n"
    lorakit("train", write_recipe(work / "cpt.yaml", base))
    sft = f"stage: sft\nparent: adapters/cpt\ndata: {{path: {chats}}}\ntrain: {{max_steps: 30, lr: 3.0e-3}}\n"
    lorakit("train", write_recipe(work / "sft.yaml", sft))
    session = Session(None, {"stacked": "adapters/sft", "cpt": "adapters/cpt"}, "cpu", torch.float32)
    # each entry is one adapter (what a batch needs): the chain's ranks concatenated
    ranks = {name: session.model.peft_config[adapter].r for name, adapter in session.entries.items()}
    assert ranks == {"stacked": 16 + 16, "cpt": 16}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    session.use("stacked")
    with torch.no_grad(), session.active() as model:
        swapped = model(input_ids=ids).logits
    merged = load_for_inference(None, "adapters/sft", "cpu", torch.float32)[0]
    with torch.no_grad():
        torch.testing.assert_close(swapped, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@contextlib.contextmanager
def _running(app):
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from lorakit.inference.guards import server_config

    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))  # as `lorakit serve` serves
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def session(domains, tiny_instruct):
    import torch

    from lorakit.inference.session import Session, parse_entries

    return Session(str(tiny_instruct), parse_entries(_specs(domains)), "cpu", torch.float32)


@pytest.fixture(scope="module")
def server(session):
    from lorakit.inference.serve import create_app

    with _running(create_app(session, max_input_tokens=200)) as url:
        yield url


@pytest.fixture(scope="module")
def long_server(session):
    """The model's whole context for long generations, and a small body limit: (url, app)."""
    from lorakit.inference.serve import create_app

    app = create_app(session, max_body=64 * 1024)
    with _running(app) as url:
        yield url, app


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _ask(server, model):
    return _post(f"{server}/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 30,
                                                   "messages": [{"role": "user", "content": QUESTION}]})


def test_the_server_lists_models_and_answers_interleaved_requests_each_with_its_adapter(server):
    with urllib.request.urlopen(f"{server}/v1/models") as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["base", "amber", "violet"]
    order = ["amber", "violet"] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda m: _ask(server, m), order))
    for model, (status, body) in zip(order, results):
        assert status == 200 and body["model"] == model
        assert body["choices"][0]["message"]["content"] == ANSWERS[model]
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] > 0
    status, body = _post(f"{server}/v1/completions", {"model": "base", "prompt": "The Orbix", "max_tokens": 5,
                                                      "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


def test_the_server_refuses_bad_requests_with_4xx_and_keeps_serving(server):
    status, body = _ask(server, "nope")
    assert status == 404 and "not found" in body["error"]["message"]
    status, body = _post(f"{server}/v1/chat/completions", None, raw=b'{"model": "amber", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = _post(f"{server}/v1/chat/completions", {"model": "amber", "messages": "hi"})
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _post(f"{server}/v1/completions", {"model": "amber", "prompt": "lamp " * 300})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = _ask(server, "violet")
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS["violet"]


def test_eval_shows_lower_perplexity_with_the_adapter_on_its_domain(domains, tiny_instruct, work):
    data = write_jsonl(work / "amber.jsonl", [{"messages": [{"role": "user", "content": QUESTION},
                                                            {"role": "assistant", "content": ANSWERS["amber"]}]}])
    table = lorakit("eval", "--model", tiny_instruct, "--adapter", f"amber={domains['amber']}", "--data", data).stdout
    rows = {line.split()[0]: float(line.split()[2]) for line in table.splitlines()[1:]}
    assert rows["amber"] < 0.5 * rows["base"], table
    assert "assistant tokens" in table.splitlines()[0]


def test_compare_writes_both_answers_for_every_prompt(domains, tiny_instruct, work):
    (work / "prompts.txt").write_text(f"{QUESTION}\nHello there\n")
    out = lorakit("compare", "--model", tiny_instruct, *sum((["--adapter", s] for s in _specs(domains)), []),
                  "--prompts", work / "prompts.txt", "-o", work / "report.md").stdout
    assert "2 prompts x 3 models" in out
    report = (work / "report.md").read_text()
    assert report.count("## Prompt") == 2 and ANSWERS["amber"] in report and ANSWERS["violet"] in report
    assert "Hello from amber." in report and "Hello from violet." in report and "| base |" in report


def test_held_out_data_is_evaluated_during_training_and_recorded(work, chats, tiny_instruct):
    text = DOMAIN_RECIPE.format(model=tiny_instruct, data=chats, output="adapters/ev").replace(
        "max_length: 96", "max_length: 96, eval_split: 0.34").replace("logging_steps: 20", "logging_steps: 20, eval_steps: 40")
    lorakit("train", write_recipe(work / "ev.yaml", text))
    metrics = load_metrics(work / "adapters" / "ev")
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [40, 80, 120] and all(m["eval_ppl"] > 1 for m in evals)
    manifest = json.loads((work / "adapters" / "ev" / "manifest.json").read_text())
    assert manifest["metrics"]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert manifest["data"]["examples"] == 2 and manifest["data"]["eval_rows"] == 1


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


LONG = {"model": "base", "prompt": "The Orbix lamp", "max_tokens": 3000, "temperature": 0}


def test_a_client_that_disconnects_stops_its_generation(long_server):
    """Ten dropped 1000-token requests used to make the next request wait 18.8 s."""
    url, app = long_server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)  # generating by now
    deadline = time.time() + 10
    while app.state.stats["cancelled"] < 1:
        assert time.time() < deadline, "the disconnect was never noticed"
        time.sleep(0.05)
    start = time.time()
    status, reply = _post(f"{url}/v1/completions", {**LONG, "max_tokens": 5})
    assert status == 200 and reply["usage"]["completion_tokens"] == 5
    assert time.time() - start < 3  # the dropped 3000-token generation did not hold the model


def test_requests_are_checked_outside_the_lock_while_another_generates(long_server):
    url, _ = long_server
    with ThreadPoolExecutor(max_workers=1) as pool:
        # 3000 tokens (about 2 s here): 400 ran in about 0.3 s on an idle machine, and were done before the check
        busy = pool.submit(_post, f"{url}/v1/completions", LONG)
        time.sleep(0.3)
        start = time.time()
        status, reply = _post(f"{url}/v1/completions", {**LONG, "prompt": "lamp " * 5000, "max_tokens": 10})
        refused_in = time.time() - start
        assert not busy.done()  # the other generation still holds the model...
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded" and refused_in < 1.5
        assert busy.result()[0] == 200


def test_a_short_request_never_waits_for_a_long_ones_length(long_server):
    """Head of line: a 20-token answer once waited 3.8 s behind a 4,000-token one. Rows now join and leave the
    running batch at token boundaries: the short one is answered while the long one is still generating."""
    url, app = long_server
    short = {"model": "base", "prompt": "Quartzfield is", "max_tokens": 20, "temperature": 0}
    alone = _post(f"{url}/v1/completions", short)[1]["choices"][0]["text"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        admitted = app.state.stats["rows"]
        busy = pool.submit(_post, f"{url}/v1/completions", LONG)
        while app.state.stats["rows"] == admitted:  # the long one is generating
            time.sleep(0.01)
        time.sleep(0.2)
        status, reply = _post(f"{url}/v1/completions", short)
        assert not busy.done()  # answered while the 3000-token generation runs on...
        assert status == 200 and reply["choices"][0]["text"] == alone  # ...with the answer it gets alone
        assert busy.result()[1]["usage"]["completion_tokens"] == 3000 and app.state.stats["largest"] >= 2


def test_a_body_over_the_limit_is_refused_before_it_is_read(long_server):
    url, _ = long_server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # announces 20 MB, sends none of it
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n")
        sock.settimeout(10)
        reply = b""
        while b"}}" not in reply:  # the status line and headers may come before the body
            reply += sock.recv(4096) or b"}}"
    head = reply.decode()
    assert head.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in head
    import http.client

    connection = http.client.HTTPConnection(host, int(port), timeout=30)  # no length given: counted as it comes
    chunks = iter([b'{"model": "base", "prompt": "'] + [b"x" * 16384] * 8 + [b'"}'])
    connection.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    assert _post(f"{url}/v1/completions", {**LONG, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", {"model": "base", "prompt": "x", "seed": 2**70}, 400, "seed:"),
    ("/v1/completions", {"model": "base", "prompt": ""}, 400, "prompt:"),
    ("/v1/completions", {"model": "base", "prompt": "x", "n": 2}, 400, "n: lorakit serve returns one choice"),
    ("/v1/chat/completions", {"model": "amber", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
     400, "logprobs: not supported"),
    ("/v1/completions", {"model": "base", "prompt": "x", "stop": [""]}, 400, "stop: at most 4 stop strings"),
    ("/v1/completions", b'{"model": "base", "prompt": "caf\xe9"}', 400, "could not be read as JSON text"),
    ("/v2/anything", {}, 404, "no such endpoint"),
])
def test_bad_requests_get_openai_errors_not_500s(server, path, body, status, message):
    raw = body if isinstance(body, bytes) else None
    code, reply = _post(f"{server}{path}", body, raw=raw)
    assert code == status and set(reply) == {"error"} and message in reply["error"]["message"], reply


def test_models_can_be_read_one_by_one_and_the_api_pages_are_off(server):
    assert _get(f"{server}/v1/models/amber") == (200, {"id": "amber", "object": "model", "owned_by": "lorakit"})
    status, reply = _get(f"{server}/v1/models/nope")
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    for page in ("/docs", "/openapi.json"):
        assert _get(f"{server}{page}")[0] == 404


def test_a_base_request_on_the_server_leaves_the_sessions_adapters_working(server, session):
    """The engine leaves peft's adapter layers as its last pass needed them (off, for the base), instead of switching
    them at every token: whatever runs on the model next still gets the adapter it chose."""
    import torch

    from lorakit.inference.generate import Sampling, chat_reply

    status, reply = _post(f"{server}/v1/chat/completions", {"model": "base", "temperature": 0, "max_tokens": 12,
                                                           "messages": [{"role": "user", "content": QUESTION}]})
    assert status == 200 and "amber" not in reply["choices"][0]["message"]["content"]
    session.use("amber")
    with torch.no_grad(), session.active() as model:
        answer = chat_reply(model, session.tokenizer, [{"role": "user", "content": QUESTION}],
                            session.system_prompt(), Sampling(greedy=True, max_new_tokens=30))
    session.use(None)
    assert answer == ANSWERS["amber"]


def test_stop_strings_are_honoured(server):
    status, reply = _post(f"{server}/v1/chat/completions", {"model": "amber", "temperature": 0, "stop": ["amber"], "max_tokens": 30,
                                                           "messages": [{"role": "user", "content": QUESTION}]})
    assert status == 200 and reply["choices"][0]["message"]["content"] == "The Orbix lamp glows "
    assert reply["choices"][0]["finish_reason"] == "stop"
