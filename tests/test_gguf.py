"""GGUF for llama.cpp and Ollama (`lorakit export --format gguf | gguf-adapter`): what llama.cpp runs from
lorakit's files answers as the adapter does in transformers.

The tests that run llama.cpp need its Python binding, llama-cpp-python (compiled from source, about 4
minutes: .ci/run builds it once into ~/.cache/lorakit/wheels); without it they are skipped with that
reason, and the file checks (tensors read back, metadata, Modelfile) still run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import llama_tasks
import numpy as np
import pytest
import torch
from conftest import CHATS, DOCS, lorakit, write_jsonl, write_recipe

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

pytestmark = pytest.mark.slow
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed here (.ci/run builds "
                                                           "it: pip wheel llama-cpp-python==0.3.36)")
needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed here (.ci/run installs Debian's "
                                                                  "golang-go): Ollama's templates are Go templates")
QUESTIONS = [q for q, _ in CHATS]  # the probe prompts
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_instruct) -> Path:
    """A CPT adapter on the tiny instruct model and an SFT adapter trained on top of it (a chain)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in DOCS])
    lorakit("train", write_recipe(folder / "cpt.yaml", f"stage: cpt\nmodel: {tiny_instruct}\noutput: {folder / 'cpt'}\n"
                                                       f"data: {{path: {folder / 'docs.jsonl'}}}\n"
                                                       "train: {max_steps: 40, lr: 3.0e-3, batch_size: 2}\n"))
    chats = write_jsonl(folder / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": a}]} for q, a in CHATS])
    lorakit("train", write_recipe(folder / "sft.yaml", f"stage: sft\nparent: {folder / 'cpt'}\noutput: {folder / 'sft'}\n"
                                                       f"data: {{path: {chats}, system_prompt: Answer briefly.}}\n"
                                                       "train: {max_steps: 80, lr: 3.0e-3, batch_size: 2}\n"))
    return folder / "sft"


@pytest.fixture(scope="module")
def exported(chain, tiny_instruct) -> dict:
    """The chain merged (the transformers reference), as GGUF in three quantizations, and as a GGUF adapter
    beside the base's own GGUF; and the reference's greedy answers and logits, computed here, in the test
    process, so that the forked llama.cpp tests run no torch (OpenMP after fork can hang)."""
    root = chain.parent
    lorakit("export", chain, "-o", root / "merged", "--dtype", "fp32")
    found = {"merged": root / "merged"}
    for quant in ("f32", "f16", "q8_0"):
        lorakit("export", chain, "--format", "gguf", "--quant", quant, "-o", root / f"gguf-{quant}")
        found[quant] = root / f"gguf-{quant}"
    lorakit("export", tiny_instruct, "--format", "gguf", "--quant", "f32", "-o", root / "base-gguf")
    lorakit("export", chain, "--format", "gguf-adapter", "--base-gguf", root / "base-gguf" / "model.gguf",
            "-o", root / "adapter-gguf")
    found["base"], found["adapter"] = root / "base-gguf", root / "adapter-gguf"
    found["greedy"], found["logits"] = _transformers_greedy(found["merged"]), _transformers_logits(found["merged"])
    return found


def _messages(question: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]


def _prompts(folder: Path) -> tuple[list[list[int]], list[int]]:
    """Each probe question as a chat prompt (with the adapter's system prompt) in token ids; the stop ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [list(tokenizer.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for q in QUESTIONS]
    return prompts, [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def _transformers_greedy(folder: Path) -> list[list[int]]:
    """The merged model's greedy answer to each probe, in plain transformers: the reference."""
    from transformers import AutoModelForCausalLM

    prompts, stops = _prompts(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    answers = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops)
        answers.append(out[0, len(ids):].tolist())
    return answers


def _transformers_logits(folder: Path) -> list[np.ndarray]:
    """The merged model's next-token logits after each probe prompt."""
    from transformers import AutoModelForCausalLM

    prompts, _ = _prompts(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]


def _isolated(task, *args, **options):
    """llama_tasks.TASK(*args) in a fresh process (llama_tasks.py says why): a crash inside llama.cpp fails
    this test, naming it, and the run goes on."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(getattr(llama_tasks, task), *args, **options).result(timeout=600)
        except BrokenProcessPool:
            pytest.fail(f"llama.cpp crashed the process running llama_tasks.{task} on {args[0]} (see docs/deploy.md: "
                        f"q8_0 on CPUs with AMX)")


def _relative_difference(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest logit difference relative to the largest logit. f32 files measured 1.4e-4 (llama.cpp's CPU
    kernels sum in another order); the adapter's scale 10% off measured 4.7e-2: the tests allow 1e-3."""
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want))


def test_a_gguf_export_carries_the_weights_the_vocabulary_the_template_and_a_modelfile(exported, chain):
    import gguf

    from lorakit.weights.gguf import parse_modelfile

    folder = exported["f16"]
    reader = gguf.GGUFReader(str(folder / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    config = json.loads((exported["merged"] / "config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == config["num_hidden_layers"]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.tokens"][:len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i)
                                                                for i in range(len(tokenizer))]
    # f16 halves the matrices; q8_0 takes them to a little over a quarter of f32's bytes
    sizes = {q: (exported[q] / "model.gguf").stat().st_size for q in ("f32", "f16", "q8_0")}
    assert sizes["f16"] < 0.6 * sizes["f32"] and sizes["q8_0"] < sizes["f16"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "gguf" and manifest["dtype"] == "f16" and manifest["system_prompt"] == "Answer briefly."
    modelfile = parse_modelfile((folder / "Modelfile").read_text())
    assert modelfile["FROM"] == ["./model.gguf"]
    assert modelfile["SYSTEM"] == ["Answer briefly."]
    assert "<|im_end|>" in modelfile["PARAMETER"][0]
    adapter = parse_modelfile((exported["adapter"] / "Modelfile").read_text())
    # Ollama reads FROM from the Modelfile's own folder
    assert adapter["FROM"] == ["../base-gguf/model.gguf"] and adapter["ADAPTER"] == ["./adapter.gguf"]
    assert (exported["adapter"] / adapter["FROM"][0]).resolve() == (exported["base"] / "model.gguf").resolve()


def _ollama_prompt(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt Ollama builds from a Modelfile TEMPLATE (Go's text/template, Ollama's message handling)."""
    found = subprocess.run(["go", "run", str(Path(__file__).parent / "ollama" / "render.go")], check=True,
                           input=json.dumps({"template": template, "messages": messages, "tools": tools}),
                           capture_output=True, text=True, timeout=300)
    return found.stdout


@needs_go
def test_the_modelfile_template_renders_in_ollamas_engine_as_the_tokenizer_template_does(exported):
    from transformers import AutoTokenizer

    from lorakit.weights.gguf import parse_modelfile

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    modelfile = parse_modelfile((exported["f16"] / "Modelfile").read_text())
    template, system = modelfile["TEMPLATE"][0], modelfile["SYSTEM"][0]
    turns = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": CHATS[0][1]},
             {"role": "user", "content": QUESTIONS[2]}]
    # a chat without a system turn: Ollama puts the Modelfile's SYSTEM first, the adapter's own prompt
    with_system = [{"role": "system", "content": system}, *turns]
    assert system == "Answer briefly."
    expected = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
    assert _ollama_prompt(template, with_system) == expected


def test_a_quantization_the_gguf_package_cannot_make_is_one_line_naming_llama_quantize(chain, tmp_path):
    result = lorakit("export", chain, "--format", "gguf", "--quant", "q4_k_m", "-o", tmp_path / "out", expect=1)
    assert "llama-quantize" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@needs_llama
def test_llama_cpp_reads_the_prompts_as_transformers_and_answers_alike_in_f32_and_f16(exported):
    from transformers import AutoTokenizer

    prompts, stops = _prompts(exported["merged"])
    reference = exported["greedy"]
    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    # the reference is what the adapter was taught (so a broken file cannot agree with it by chance)
    assert [tokenizer.decode(a) for a in reference] == [f"{answer}<|im_end|>" for _, answer in CHATS]
    for quant in ("f32", "f16"):
        path = str(exported[quant] / "model.gguf")
        # the vocabulary, merges and special tokens: the same text, the same ids
        assert _isolated("tokenize", path, [tokenizer.decode(ids) for ids in prompts]) == prompts, quant
        assert _isolated("greedy", path, prompts, stops, NEW_TOKENS) == reference, quant
        if quant == "f32":  # and the numbers themselves, to the kernels' rounding
            assert _relative_difference(_isolated("logits", path, prompts), exported["logits"]) < 1e-3


def test_a_crash_inside_the_engine_fails_one_test_not_the_run():
    with pytest.raises(pytest.fail.Exception, match="llama.cpp crashed the process running llama_tasks.crash"):
        _isolated("crash", "model.gguf")


@needs_llama
def test_q8_0_answers_with_at_least_95_percent_of_the_same_tokens(exported):
    prompts, stops = _prompts(exported["merged"])
    answers = _isolated("greedy", str(exported["q8_0"] / "model.gguf"), prompts, stops, NEW_TOKENS)
    expected = exported["greedy"]
    same = sum(a == b for got, want in zip(answers, expected) for a, b in zip(got, want))
    total = sum(len(want) for want in expected)
    assert same >= 0.95 * total, (answers, expected)


@needs_llama
def test_the_adapter_gguf_on_the_base_gguf_answers_as_the_adapter(exported):
    prompts, stops = _prompts(exported["merged"])
    reference = exported["greedy"]
    base = str(exported["base"] / "model.gguf")
    assert _isolated("greedy", base, prompts, stops, NEW_TOKENS) != reference  # without the adapter: other answers
    lora = {"lora_path": str(exported["adapter"] / "adapter.gguf")}
    assert _isolated("greedy", base, prompts, stops, NEW_TOKENS, **lora) == reference
    # the adapter's scale (alpha / r) and every A, B where llama.cpp applies them: the same logits
    assert _relative_difference(_isolated("logits", base, prompts, **lora), exported["logits"]) < 1e-3


@needs_llama
def test_the_template_in_the_file_renders_a_conversation_as_the_tokenizer_does_and_chat_stops_at_the_turn(exported):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    # llama.cpp's own chat completion (template and stop token from the file) gives the adapter's answer
    template, reply = _isolated("chat", str(exported["f32"] / "model.gguf"), _messages(QUESTIONS[1]), NEW_TOKENS)
    conversation = _messages(QUESTIONS[0]) + [{"role": "assistant", "content": CHATS[0][1]},
                                              {"role": "user", "content": QUESTIONS[2]}]
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>",
                                    bos_token="<|endoftext|>", add_generation_prompt=True)
    assert formatter(messages=conversation).prompt == tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False)
    reference = exported["greedy"][1]
    assert reply == tokenizer.decode(reference, skip_special_tokens=True)
