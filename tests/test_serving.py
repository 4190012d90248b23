"""Serving adapters for real traffic: a chain exported as one adapter, streaming through the official
openai client, requests for different adapters batched together, the comparison page in a browser."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import CHATS, DOCS, lorakit, write_jsonl, write_recipe
from test_inference import ANSWERS, QUESTION, _post, _running, _specs

pytestmark = pytest.mark.slow  # every test here trains a model

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_base):
    """A CPT adapter and the SFT adapter trained on top of it."""
    folder = tmp_path_factory.mktemp("chain")
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(folder / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]} for q, a in CHATS])
    train = "train: {max_steps: 60, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0}\n"
    lorakit("train", write_recipe(folder / "cpt.yaml", f"stage: cpt\nmodel: {tiny_base}\noutput: {folder / 'cpt'}\n"
                                                       f"data: {{path: {folder / 'docs.jsonl'}}}\n{train}"))
    lorakit("train", write_recipe(folder / "sft.yaml", f"stage: sft\nparent: {folder / 'cpt'}\noutput: {folder / 'sft'}\n"
                                                       f"data: {{path: {folder / 'chats.jsonl'}, system_prompt: Be brief.}}\n"
                                                       f"lora: {{r: 8, alpha: 32}}\n{train}"))
    return folder / "sft"


def test_a_chain_exports_as_one_plain_peft_adapter_with_the_chains_logits(work, chain, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.weights.folders import load_for_inference

    out = lorakit("export", chain, "--format", "adapter", "-o", work / "flat").stdout
    assert "adapter written to" in out
    flat = work / "flat"
    config = json.loads((flat / "adapter_config.json").read_text())
    assert config["r"] == 16 + 8 and config["lora_alpha"] == config["r"]  # ranks concatenate, scale 1
    assert not (flat / "parent").exists() and (flat / "chat_template.jinja").is_file()
    manifest = json.loads((flat / "manifest.json").read_text())
    assert manifest["system_prompt"] == "Be brief." and manifest["verify"]["max_logit_diff"] <= 1e-3
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), flat).eval()
    chain_model = load_for_inference(None, str(chain), "cpu", torch.float32).model
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, chain_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    reply = lorakit("chat", "--adapter", flat, "--greedy", "--prompt", CHATS[0][0]).stdout.strip()
    assert reply == lorakit("chat", "--adapter", chain, "--greedy", "--prompt", CHATS[0][0]).stdout.strip()


def test_a_flattening_that_does_not_match_leaves_nothing(work, chain, monkeypatch):
    from lorakit.weights import flatten

    real = flatten.flatten_into

    def wrong(model, folders, name=flatten.FLAT):
        model = real(model, folders, name)
        for module in model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                module.lora_B[name].weight.data.mul_(2)
        return model

    monkeypatch.setattr(flatten, "flatten_into", wrong)
    result = lorakit("export", chain, "--format", "adapter", "-o", work / "flat", expect=1)
    assert "flattening" in result.stderr and "logits differ by" in result.stderr
    assert not (work / "flat").exists() and not list(work.glob(".flat*"))


def test_a_full_fine_tune_is_not_flattened(work, corpus, tiny_base):
    lorakit("train", write_recipe(work / "f.yaml", f"stage: cpt\nmodel: {tiny_base}\nmethod: full\n"
                                                   f"data: {{path: {corpus}}}\ntrain: {{max_steps: 1}}\n"))
    result = lorakit("export", work / "adapters" / "f", "--format", "adapter", "-o", work / "flat", expect=1)
    assert "is a fully fine-tuned model, not an adapter" in result.stderr


@pytest.fixture(scope="module")
def served(domains, chain, tiny_instruct, tiny_base):
    """lorakit serve over the two SFT adapters of test_inference (amber, violet) on tiny_instruct."""
    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session, parse_entries

    session = Session(str(tiny_instruct), parse_entries(_specs(domains)), "cpu", torch.float32)
    app = create_app(session, max_body=64 * 1024)
    with _running(app) as url:
        yield url, app


def test_streaming_through_the_official_openai_client(served):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    pieces, usage = [], None
    stream = client.chat.completions.create(model="amber", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    finish = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == ANSWERS["amber"] and len([p for p in pieces if p]) > 3  # it came in pieces
    assert finish == "stop" and usage.completion_tokens > 0 and usage.total_tokens > usage.completion_tokens
    whole = client.chat.completions.create(model="amber", messages=[{"role": "user", "content": QUESTION}], temperature=0)
    assert whole.choices[0].message.content == ANSWERS["amber"]
    text = "".join(c.choices[0].text for c in client.completions.create(model="base", prompt="The Orbix", max_tokens=6,
                                                                         temperature=0, stream=True) if c.choices)
    assert text == client.completions.create(model="base", prompt="The Orbix", max_tokens=6, temperature=0).choices[0].text


def test_concurrent_requests_for_different_adapters_are_batched_and_each_gets_its_own_answer(served):
    url, app = served
    before = dict(app.state.stats)
    order = ["amber", "violet", "base", "amber"] * 4  # 16 clients at once
    ask = lambda m: _post(f"{url}/v1/chat/completions", {"model": m, "temperature": 0, "max_tokens": 30,
                                                        "messages": [{"role": "user", "content": QUESTION}]})
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, order))
    alone = _post(f"{url}/v1/chat/completions", {"model": "base", "temperature": 0, "max_tokens": 30,
                                                 "messages": [{"role": "user", "content": QUESTION}]})[1]
    for model, (status, body) in zip(order, results):
        assert status == 200
        expected = ANSWERS.get(model, alone["choices"][0]["message"]["content"])
        assert body["choices"][0]["message"]["content"] == expected, model
    rows, passes = app.state.stats["rows"] - before["rows"], app.state.stats["passes"] - before["passes"]
    tokens = sum(body["usage"]["completion_tokens"] for _, body in results) + alone["usage"]["completion_tokens"]
    assert rows == 17 and passes < tokens / 4 and app.state.stats["largest"] >= 4  # rows shared forward passes


def test_rows_that_join_and_leave_a_running_batch_get_the_answers_they_get_alone(served):
    """Continuous batching: requests of different lengths and adapters arrive while others generate and leave when
    they end; every answer is the one its request gets alone."""
    url, app = served
    asks = [("amber", "The Orbix", 40), ("base", "Quartzfield is a", 3), ("violet", "lamp", 25),
            ("base", "The Orbix lamp glows", 12), ("amber", "What colour", 7), ("violet", "The", 33)]
    ask = lambda model, prompt, n: _post(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                                                  "temperature": 0})[1]
    alone = [ask(*a)["choices"][0]["text"] for a in asks]
    before = dict(app.state.stats)
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        together = []
        for a in asks:  # one arrival every few tokens
            together.append(pool.submit(ask, *a))
            time.sleep(0.01)
        replies = [f.result() for f in together]
    assert [r["choices"][0]["text"] for r in replies] == alone
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    assert app.state.stats["rows"] - before["rows"] == len(asks)
    assert app.state.stats["passes"] - before["passes"] < tokens  # some arrived while others generated


def test_sampling_settings_are_honoured(served):
    url, _ = served
    ask = lambda **kw: _post(f"{url}/v1/completions", {"model": "base", "prompt": "The", "max_tokens": 12, **kw})[1]
    one, again = ask(temperature=1.0, seed=7), ask(temperature=1.0, seed=7)
    assert one["choices"][0]["text"] == again["choices"][0]["text"]  # the same seed, the same answer
    others = {ask(temperature=1.0, seed=s)["choices"][0]["text"] for s in range(8)}
    assert len(others) > 1  # sampling samples
    assert ask(temperature=0, max_tokens=3)["usage"]["completion_tokens"] <= 3
    narrow = {ask(temperature=1.0, top_p=1e-6, seed=s)["choices"][0]["text"] for s in range(4)}
    assert narrow == {ask(temperature=0)["choices"][0]["text"]}  # top_p that keeps one token is greedy


def test_a_streaming_client_that_leaves_stops_its_row(served):
    import http.client

    url, app = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"model": "base", "prompt": "The Orbix lamp",
                                                                    "max_tokens": 3000, "temperature": 0, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # leaves mid-stream
    start = time.time()
    status, body = _post(f"{url}/v1/completions", {"model": "base", "prompt": "The", "max_tokens": 2, "temperature": 0})
    assert status == 200 and time.time() - start < 3


def test_the_page_asks_every_model_at_once_in_a_real_browser(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".column")) == 3)
    assert [c.get_attribute("data-model") for c in browser.find_elements(By.CSS_SELECTOR, ".column")] == \
        ["base", "amber", "violet"]
    browser.find_element(By.ID, "prompt").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(lambda b: all(
        c.find_element(By.CSS_SELECTOR, "small").text.startswith(("stop", "length"))
        for c in b.find_elements(By.CSS_SELECTOR, ".column")))
    answers = {c.get_attribute("data-model"): c.find_element(By.CSS_SELECTOR, ".answer").text
               for c in browser.find_elements(By.CSS_SELECTOR, ".column")}
    assert answers["amber"] == ANSWERS["amber"] and answers["violet"] == ANSWERS["violet"] and answers["base"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-page.png"))
    assert (ARTIFACTS / "serve-page.png").stat().st_size > 10_000
