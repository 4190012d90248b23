"""End to end through the real CLI on tiny models: the adapter learns, the base stays untouched,
and the adapter folder is complete and loads in plain peft."""

import json

import pytest
import torch
from conftest import CHATS, DOCS, load_metrics, lorakit, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains a model

CPT = """stage: cpt
model: {model}
data: {{path: {data}, max_length: 64}}
lora: {{r: 16, alpha: 32, dropout: 0.0}}
train: {{max_steps: {steps}, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0, logging_steps: 10}}
"""
SFT = """stage: sft
{base}
data: {{path: {data}, max_length: 96}}
lora: {{r: 16, alpha: 32, dropout: 0.0}}
train: {{max_steps: {steps}, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0, logging_steps: 10}}
"""


@pytest.fixture
def cpt_adapter(work, corpus, tiny_base):
    recipe = write_recipe(work / "cpt.yaml", CPT.format(model=tiny_base, data=corpus, steps=150))
    result = lorakit("train", recipe)
    assert "adapter written to adapters/cpt" in result.stdout
    return work / "adapters" / "cpt"


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_cpt_learns_the_documents_and_leaves_the_base_untouched(cpt_adapter, tiny_base):
    metrics = load_metrics(cpt_adapter)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    continued = lorakit("generate", "--adapter", cpt_adapter, "--greedy", "--max-new-tokens", "40",
                        "The Orbix lamp").stdout.strip()
    assert continued.startswith(DOCS[0][:60]), continued
    before = lorakit("generate", "--model", tiny_base, "--greedy", "--max-new-tokens", "40",
                     "The Orbix lamp").stdout.strip()
    assert not before.startswith(DOCS[0][:30])
    adapter = load_file(cpt_adapter / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero


def test_base_weights_are_untouched_by_training(work, corpus, tiny_base):
    before = _weights(tiny_base)
    lorakit("train", write_recipe(work / "cpt.yaml", CPT.format(model=tiny_base, data=corpus, steps=5)))
    after = _weights(tiny_base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_adapter_folder_is_complete_and_self_describing(cpt_adapter, tiny_base):
    names = {p.name for p in cpt_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png"} <= names
    assert not list(cpt_adapter.parent.glob(".cpt.*"))  # no staging folder left behind
    manifest = json.loads((cpt_adapter / "manifest.json").read_text())
    assert manifest["stage"] == "cpt" and manifest["base_model"] == str(tiny_base) and manifest["parent"] is None
    assert len(manifest["base_fingerprint"]) == 16 and len(manifest["data"]["hash"]) == 16
    assert manifest["data"]["examples"] == len(DOCS)
    assert {"lorakit", "torch", "transformers", "peft"} <= manifest["versions"].keys()
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
    assert (cpt_adapter / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "lorakit validate" not in (cpt_adapter / "recipe.yaml").read_text()
    lorakit("validate", cpt_adapter / "recipe.yaml")


def test_plain_peft_loads_the_adapter_with_the_same_logits_as_lorakit(cpt_adapter, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.weights.folders import load_for_inference

    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), cpt_adapter).eval()
    ours, _, _ = load_for_inference(None, str(cpt_adapter), "cpu", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        plain_logits, our_logits, base_logits = (m(input_ids=ids).logits for m in (plain, ours, base))
    torch.testing.assert_close(our_logits, plain_logits)
    assert (our_logits - base_logits).abs().max() > 0.1  # the adapter does something


def test_sft_on_top_of_cpt_answers_from_its_training_and_records_the_parent(work, cpt_adapter, chats):
    recipe = write_recipe(work / "chat.yaml", SFT.format(base=f"parent: {cpt_adapter}", data=chats, steps=150))
    lorakit("train", recipe)
    adapter = work / "adapters" / "chat"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["parent"]["name"] == "cpt" and (adapter / "parent" / "adapter_model.safetensors").is_file()
    assert manifest["system_prompt"] == "You are a helpful assistant."
    metrics = load_metrics(adapter)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    for question, answer in CHATS:
        reply = lorakit("chat", "--adapter", adapter, "--greedy", "--prompt", question).stdout.strip()
        assert reply == answer
    # The CPT knowledge is still there underneath: the chain applies the parent first.
    assert "Orbix" in lorakit("generate", "--adapter", adapter, "--greedy", "The Orbix").stdout


def test_sft_on_the_instruct_model_learns_to_answer(work, chats, tiny_instruct):
    recipe = write_recipe(work / "sft.yaml", SFT.format(base=f"model: {tiny_instruct}", data=chats, steps=150))
    lorakit("train", recipe)
    question, answer = CHATS[0]
    before = lorakit("chat", "--model", tiny_instruct, "--greedy", "--prompt", question).stdout.strip()
    after = lorakit("chat", "--adapter", "adapters/sft", "--greedy", "--prompt", question).stdout.strip()
    assert after == answer and before != answer


def test_inspect_shows_the_parameter_shares(cpt_adapter, tiny_base):
    plain = lorakit("inspect", tiny_base).stdout
    assert "model.layers.0.self_attn.q_proj.weight" in plain and "embedding and output layers" in plain
    with_adapter = lorakit("inspect", tiny_base, "--adapter", cpt_adapter).stdout
    assert "lora_A" in with_adapter and "trainable (adapter):" in with_adapter


def test_the_logged_token_count_is_the_tokens_trained(work, corpus, tiny_base):
    text = CPT.format(model=tiny_base, data=corpus, steps=-1).replace("max_steps: -1", "epochs: 2, grad_accum: 2")
    lorakit("train", write_recipe(work / "acc.yaml", text.replace("logging_steps: 10", "logging_steps: 1")))
    adapter = work / "adapters" / "acc"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert load_metrics(adapter)[-1]["tokens"] == 2 * manifest["data"]["tokens"]


def test_interactive_chat_keeps_the_conversation(work, tiny_instruct):
    from click.testing import CliRunner

    from lorakit.cli import main

    result = CliRunner().invoke(main, ["chat", "--model", str(tiny_instruct), "--greedy", "--max-new-tokens", "5"],
                                input="Hello there\n/reset\nHow are you?\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant> ") == 2
