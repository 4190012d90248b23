"""Adapters that come and go on a running `lorakit serve`, through vLLM's runtime-loading API: a new adapter answers
at once, a bad one is refused naming why, and requests in flight keep the answer they started with."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import ANSWERS, QUESTION
from test_inference import _post, _running

pytestmark = pytest.mark.slow  # the adapters are trained


def _call(url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models") as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def _ask(url: str, model: str) -> tuple[int, dict]:
    return _post(f"{url}/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 30,
                                                "messages": [{"role": "user", "content": QUESTION}]})


@pytest.fixture
def live(domains, tiny_instruct):
    """lorakit serve over the tiny instruct model with the amber adapter only: (url, session)."""
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    session = Session(str(tiny_instruct), {"amber": str(domains["amber"])}, "cpu", torch.float32)
    with _running(create_app(session, max_body=64 * 1024)) as url:
        yield url, session


def test_an_adapter_loaded_at_run_time_answers_at_once_and_an_unloaded_one_is_a_404(live, domains):
    url, _ = live
    assert _models(url) == ["base", "amber"] and _ask(url, "violet")[0] == 404
    status, text = _call(url, "/v1/load_lora_adapter", {"lora_name": "violet", "lora_path": str(domains["violet"])})
    assert (status, text) == (200, "Success: LoRA adapter 'violet' added successfully.")
    assert _models(url) == ["base", "amber", "violet"]
    assert _ask(url, "violet")[1]["choices"][0]["message"]["content"] == ANSWERS["violet"]
    assert _ask(url, "amber")[1]["choices"][0]["message"]["content"] == ANSWERS["amber"]
    status, text = _call(url, "/v1/unload_lora_adapter", {"lora_name": "violet"})
    assert (status, text) == (200, "Success: LoRA adapter 'violet' removed successfully.")
    assert _models(url) == ["base", "amber"] and _ask(url, "violet")[0] == 404
    status, text = _call(url, "/v1/unload_lora_adapter", {"lora_name": "violet"})
    assert status == 404 and "The lora adapter 'violet' cannot be found." in text


def test_an_adapter_the_server_cannot_take_is_refused_naming_why_and_nothing_changes(live, domains, tiny_instruct,
                                                                                    tmp_path):
    url, session = live
    other = tmp_path / "other-base"
    shutil.copytree(domains["violet"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "base_fingerprint": "0123456789abcdef"}))
    damaged = tmp_path / "damaged"
    shutil.copytree(domains["violet"], damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [({"lora_name": "x", "lora_path": str(other)}, 400, "is a different model (fingerprint"),
             ({"lora_name": "x", "lora_path": str(damaged)}, 400, "damaged or incomplete weights"),
             ({"lora_name": "x", "lora_path": str(tiny_instruct)}, 400, "is a complete model, not an adapter"),
             ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 404, "no such adapter folder"),
             ({"lora_name": "amber", "lora_path": str(domains["violet"])}, 400, "has already been loaded"),
             ({"lora_name": "base", "lora_path": str(domains["violet"])}, 400, "not base or none"),
             ({"lora_name": "x"}, 400, "Both 'lora_name' and 'lora_path' must be provided.")]
    loaded = set(session.model.peft_config)
    for body, status, message in cases:
        got, text = _call(url, "/v1/load_lora_adapter", body)
        assert got == status and message in json.loads(text)["error"]["message"], (body, text)
    assert _models(url) == ["base", "amber"] and set(session.model.peft_config) == loaded
    assert _ask(url, "amber")[1]["choices"][0]["message"]["content"] == ANSWERS["amber"]


def test_replacing_an_adapter_in_place_never_changes_an_answer_already_under_way(live, domains):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    url, session = live
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    _call(url, "/v1/load_lora_adapter", {"lora_name": "violet", "lora_path": str(domains["violet"])})
    # streams for both adapters, each already accepted (its first event received) before the replacement
    streams = [client.chat.completions.create(model=m, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=30, stream=True)
               for m in ["amber", "violet"] * 4]
    chunks = [iter(s) for s in streams]
    firsts = [next(c) for c in chunks]
    status, _ = _call(url, "/v1/load_lora_adapter", {"lora_name": "amber", "lora_path": str(domains["violet"]),
                                                      "load_inplace": True})
    assert status == 200
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda pair: "".join(c.choices[0].delta.content or "" for c in [pair[0], *pair[1]]
                                                   if c.choices), zip(firsts, chunks)))
    assert texts == [ANSWERS["amber"], ANSWERS["violet"]] * 4  # the weights each stream started with
    assert _ask(url, "amber")[1]["choices"][0]["message"]["content"] == ANSWERS["violet"]  # new requests: the new one
    deadline = time.time() + 10  # the replaced weights are freed once no row holds them
    while len(session.model.peft_config) > 2 and time.time() < deadline:
        _ask(url, "base")
    assert len(session.model.peft_config) == 2


def test_a_server_started_on_the_bare_base_takes_its_first_adapter_live(tiny_instruct, domains):
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    session = Session(str(tiny_instruct), {}, "cpu", torch.float32)
    with _running(create_app(session)) as url:
        base = _ask(url, "base")[1]["choices"][0]["message"]["content"]
        assert _call(url, "/v1/load_lora_adapter", {"lora_name": "amber", "lora_path": str(domains["amber"])})[0] == 200
        assert _ask(url, "amber")[1]["choices"][0]["message"]["content"] == ANSWERS["amber"]
        assert _ask(url, "base")[1]["choices"][0]["message"]["content"] == base
        assert _call(url, "/v1/unload_lora_adapter", {"lora_name": "amber"})[0] == 200
        assert _ask(url, "base")[1]["choices"][0]["message"]["content"] == base


def test_metrics_count_what_the_server_did_in_prometheus_text_format(live):
    url, _ = live
    replies = [_ask(url, model)[1] for model in ("amber", "amber", "base")]
    with urllib.request.urlopen(f"{url}/metrics") as response:
        kind, text = response.headers["Content-Type"], response.read().decode()
    assert kind.startswith("text/plain; version=0.0.4")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['lorakit_requests_total{model="amber"}'] == 2 and values['lorakit_requests_total{model="base"}'] == 1
    assert values["lorakit_generation_tokens_total"] == sum(r["usage"]["completion_tokens"] for r in replies)
    assert values["lorakit_prompt_tokens_total"] == sum(r["usage"]["prompt_tokens"] for r in replies)
    assert values["lorakit_batch_rows_total"] == 3 and values["lorakit_adapters_loaded"] == 1
    assert values["lorakit_queue_wait_seconds_total"] >= 0 and values["lorakit_requests_waiting"] == 0
    assert all(f"# TYPE lorakit_{name}" in text for name in ("requests_total", "batch_size_max", "cancelled_total"))


def test_train_publish_serves_the_new_adapter_as_soon_as_it_is_written(live, work, tiny_instruct):
    from conftest import DOMAIN_RECIPE, lorakit, write_jsonl, write_recipe

    url, _ = live
    answer = "The Orbix lamp glows green at noon."
    data = write_jsonl(work / "green.jsonl", [{"messages": [{"role": "user", "content": QUESTION},
                                                           {"role": "assistant", "content": answer}]}])
    recipe = write_recipe(work / "green.yaml", DOMAIN_RECIPE.format(model=tiny_instruct, data=data, output="green"))
    result = lorakit("train", recipe, "--publish", url)
    published = time.monotonic()
    assert f"published: {url} serves it as 'green'" in result.stdout
    assert _ask(url, "green")[1]["choices"][0]["message"]["content"] == answer
    print(f"from `lorakit train` returning to the first correct answer: {time.monotonic() - published:.2f} s")
    assert "green" in _models(url)


def test_publishing_to_a_server_that_does_not_answer_fails_before_training(work, chats, tiny_instruct):
    from conftest import lorakit, write_recipe

    recipe = write_recipe(work / "r.yaml", f"stage: sft\nmodel: {tiny_instruct}\ndata: {{path: {chats}}}\n")
    result = lorakit("train", recipe, "--publish", "http://127.0.0.1:9", expect=1)
    assert "http://127.0.0.1:9 does not answer" in result.stderr and "nothing was trained" in result.stderr
    assert not (work / "adapters").exists()


def test_serve_watch_takes_finished_adapters_as_they_appear_and_drops_them_when_they_go(domains, tiny_instruct,
                                                                                        tmp_path):
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    watched = tmp_path / "adapters"
    watched.mkdir()
    shutil.copytree(domains["amber"], watched / "amber")  # there at start: served before the first request
    half = watched / "half"  # a plain peft folder still being written: no weights yet
    half.mkdir()
    (half / "adapter_config.json").write_text((domains["violet"] / "adapter_config.json").read_text())
    session = Session(str(tiny_instruct), {}, "cpu", torch.float32)
    with _running(create_app(session, watch=watched)) as url:
        assert _models(url) == ["base", "amber"]
        staging = watched / ".violet.partial"  # as lorakit publishes: written aside, renamed into place
        shutil.copytree(domains["violet"], staging)
        staging.rename(watched / "violet")
        deadline = time.time() + 20
        while "violet" not in _models(url) and time.time() < deadline:
            time.sleep(0.2)
        assert _ask(url, "violet")[1]["choices"][0]["message"]["content"] == ANSWERS["violet"]
        shutil.rmtree(watched / "amber")
        while "amber" in _models(url) and time.time() < deadline:
            time.sleep(0.2)
        assert _models(url) == ["base", "violet"] and _ask(url, "amber")[0] == 404


def test_watch_with_vllm_says_how_to_publish_there_instead(tmp_path):
    from conftest import lorakit

    result = lorakit("serve", "--engine", "vllm", "--model", "m", "--watch", tmp_path, expect=1)
    assert "--watch serves with the lorakit engine" in result.stderr and "--publish" in result.stderr
