"""Merge and export that can be trusted: verified, QLoRA-aware, refusing the wrong base."""

import json

import pytest
import torch
from conftest import CHATS, DOCS, lorakit, write_jsonl, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit.weights.export as export_module

pytestmark = pytest.mark.slow  # every test here trains a model

RECIPE = """stage: {stage}
{base}
method: {method}
output: {output}
data: {{path: {data}, max_length: 96}}
lora: {{r: {r}, alpha: {alpha}, dropout: 0.0}}
train: {{max_steps: 120, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0, logging_steps: 20, dtype: {dtype}}}
"""
PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 12]])


def _train(folder, name, stage, base, data, method="lora", r=16, alpha=32, dtype="auto"):
    recipe = write_recipe(folder / f"{name}.yaml", RECIPE.format(stage=stage, base=base, method=method, r=r, dtype=dtype,
                                                                 alpha=alpha, output=folder / name, data=data))
    lorakit("train", recipe)
    return folder / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """A CPT adapter, an SFT adapter on top of it, a QLoRA adapter and two rank-different SFT adapters."""
    folder = tmp_path_factory.mktemp("adapters")
    corpus = folder / "docs.jsonl"
    write_jsonl(corpus, [{"text": d} for d in DOCS])
    chats = write_jsonl(folder / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": a}]}
                                                 for q, a in CHATS])
    cpt = _train(folder, "cpt", "cpt", f"model: {tiny_base}", corpus)
    return {
        "cpt": cpt,
        "sft": _train(folder, "sft", "sft", f"parent: {cpt}", chats),
        "qlora": _train(folder, "qlora", "cpt", f"model: {tiny_base}", corpus, method="qlora", dtype="fp32"),
        "chat8": _train(folder, "chat8", "sft", f"model: {tiny_base}", chats, r=8, alpha=16),
        "chat16": _train(folder, "chat16", "sft", f"model: {tiny_base}", chats),
    }


def _logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_on_base(*adapters, quantized=True):
    from lorakit.weights.folders import load_for_inference

    return load_for_inference(None, [str(a) for a in adapters], "cpu", torch.float32, quantized=quantized)[0]


def test_a_merged_export_reloads_in_plain_transformers_with_the_adapters_logits(work, trained, tiny_base):
    out = lorakit("merge", "--adapter", trained["cpt"], "-o", work / "merged", "--dtype", "fp32").stdout
    assert "model written to" in out
    merged = AutoModelForCausalLM.from_pretrained(work / "merged")
    torch.testing.assert_close(_logits(merged), _logits(_adapter_on_base(trained["cpt"])), atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert (_logits(merged) - _logits(base)).abs().max() > 0.1  # the adapter did something
    manifest = json.loads((work / "merged" / "manifest.json").read_text())
    assert manifest["verify"]["max_logit_diff"] <= manifest["verify"]["tolerance"]


def test_a_cpt_then_sft_chain_merges_in_order(work, trained, tiny_base):
    from peft import PeftModel

    lorakit("merge", "--adapter", trained["cpt"], "--adapter", trained["sft"], "-o", work / "chain", "--dtype", "fp32")
    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), trained["cpt"]).merge_and_unload()
    by_hand = PeftModel.from_pretrained(by_hand, trained["sft"]).merge_and_unload()
    chain = AutoModelForCausalLM.from_pretrained(work / "chain")
    torch.testing.assert_close(_logits(chain), _logits(by_hand), atol=1e-4, rtol=1e-4)
    lorakit("export", trained["sft"], "-o", work / "sft-alone", "--dtype", "fp32")  # the parent comes along
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(work / "sft-alone")), _logits(chain))


def test_bf16_export_is_half_the_size_and_sharded_with_an_index(work, trained):
    lorakit("export", trained["cpt"], "-o", work / "fp32", "--dtype", "fp32")
    lorakit("export", trained["cpt"], "-o", work / "bf16", "--dtype", "bf16", "--shard-size", "200KB")
    size = {d: sum(p.stat().st_size for p in (work / d).glob("*.safetensors")) for d in ("fp32", "bf16")}
    assert 0.45 < size["bf16"] / size["fp32"] < 0.55
    assert (work / "bf16" / "model.safetensors.index.json").is_file() and len(list((work / "bf16").glob("*.safetensors"))) > 1
    assert AutoModelForCausalLM.from_pretrained(work / "bf16").dtype == torch.bfloat16
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in (work / "bf16").iterdir()}


def test_an_exported_chat_model_stops_at_im_end(work, trained):
    lorakit("export", trained["sft"], "-o", work / "chat", "--dtype", "fp32")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(work / "chat"), AutoTokenizer.from_pretrained(work / "chat")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id[0] == im_end and tokenizer.eos_token == "<|im_end|>"
    question, answer = CHATS[0]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == im_end and tokenizer.decode(new[:-1]) == answer  # stopped right after the answer


def test_a_qlora_adapter_merges_onto_the_dequantized_base_and_original_reports_drift(work, trained):
    out = lorakit("export", trained["qlora"], "-o", work / "q", "--dtype", "fp32")
    assert "verified" in out.stderr
    merged = AutoModelForCausalLM.from_pretrained(work / "q")
    four_bit = _adapter_on_base(trained["qlora"])
    torch.testing.assert_close(_logits(merged), _logits(four_bit), atol=1e-4, rtol=1e-4)
    original = lorakit("export", trained["qlora"], "-o", work / "q-orig", "--dtype", "fp32", "--onto", "original")
    drift = json.loads((work / "q-orig" / "manifest.json").read_text())["drift_from_trained"]
    assert drift > 1e-3 and "differ from the quantized model it was trained as" in original.stderr


def test_an_adapter_for_a_different_base_is_refused_unless_forced(work, trained, other_base):
    result = lorakit("chat", "--model", other_base, "--adapter", trained["sft"], "--prompt", "hi", expect=1)
    assert "was trained on" in result.stderr and str(other_base) in result.stderr and "--force" in result.stderr
    result = lorakit("export", trained["cpt"], "--model", other_base, "-o", work / "x", expect=1)
    assert not (work / "x").exists()
    result = lorakit("chat", "--model", other_base, "--adapter", trained["sft"], "--prompt", "hi", "--force", expect=1)
    assert "does not fit" in result.stderr  # forced, the shapes still cannot match: said in one line


def test_a_plain_peft_adapter_still_loads_with_a_warning(work, trained, tiny_base):
    import shutil

    plain = work / "plain"
    shutil.copytree(trained["cpt"], plain)
    (plain / "manifest.json").unlink()
    result = lorakit("generate", "--model", tiny_base, "--adapter", plain, "--greedy", "The Orbix lamp")
    assert "could not be checked" in result.stderr and result.stdout.startswith(DOCS[0][:40])


def test_a_weighted_combination_is_a_plain_peft_adapter_equal_to_the_weighted_sum(work, trained, tiny_base):
    from peft import PeftModel

    lorakit("merge", "--adapter", trained["chat8"], "--adapter", trained["chat16"], "--weights", "0.6,0.4",
            "-o", work / "mix")
    mix = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), work / "mix")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    w = {k: v for k, v in base.state_dict().items()}
    for name, weight in zip(("chat8", "chat16"), (0.6, 0.4)):  # base + 0.6 * delta8 + 0.4 * delta16, by hand
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), trained[name]).merge_and_unload()
        for k, v in merged.state_dict().items():
            w[k] = w[k] + weight * (v - base.state_dict()[k])
    base.load_state_dict(w)
    torch.testing.assert_close(_logits(mix), _logits(base), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("combination, reason", [("linear", "needs equal ranks"), ("ties", "needs equal ranks")])
def test_combinations_that_would_be_wrong_are_refused(work, trained, combination, reason):
    result = lorakit("merge", "--adapter", trained["chat8"], "--adapter", trained["chat16"], "--weights", "0.5,0.5",
                     "--combination", combination, "-o", work / "bad", expect=1)
    assert reason in result.stderr and not (work / "bad").exists()
    result = lorakit("merge", "--adapter", trained["cpt"], "--adapter", trained["sft"], "--weights", "0.5,0.5",
                     "-o", work / "bad", expect=1)
    assert "different parents" in result.stderr


def test_a_failed_verification_leaves_no_output(work, trained, monkeypatch):
    real = export_module.merged_model

    def wrong(adapters, *args, **kwargs):  # a merge that silently drops the adapter
        model, tokenizer = real(adapters, *args, **kwargs)
        for p in model.parameters():
            p.data.add_(0.05)
        return model, tokenizer

    monkeypatch.setattr(export_module, "merged_model", wrong)
    result = lorakit("export", trained["cpt"], "-o", work / "broken", "--dtype", "fp32", expect=1)
    assert "logits differ by" in result.stderr
    assert not (work / "broken").exists() and not list(work.glob(".broken*"))


def test_adapters_list_and_show(work, trained):
    table = lorakit("adapters", "list", trained["cpt"].parent).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"cpt", "sft", "qlora", "chat8", "chat16"}
    assert rows["sft"][1:3] == ["sft", "lora"] and rows["sft"][4] == "cpt" and rows["qlora"][2] == "qlora"
    shown = json.loads(lorakit("adapters", "show", trained["sft"]).stdout)
    assert shown["stage"] == "sft" and shown["parent"]["name"] == "cpt"


def test_plain_peft_reproduces_a_chain_only_with_the_parent_merged_first_as_the_readme_says(trained, tiny_base):
    """README: an adapter trained on top of a parent needs the parent merged into the base first."""
    from peft import PeftModel

    ours = _logits(_adapter_on_base(trained["sft"]))
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    merged_parent = PeftModel.from_pretrained(base, trained["sft"] / "parent").merge_and_unload()
    documented = PeftModel.from_pretrained(merged_parent, trained["sft"])
    torch.testing.assert_close(_logits(documented), ours, atol=1e-4, rtol=1e-4)
    child_alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), trained["sft"])
    assert (_logits(child_alone) - ours).abs().max() > 0.1  # what the README warns against
