"""Each LoRA variant trains, and what it writes means on the original base what was trained: plain peft answers as
taught, merges and exports are exact, a chain with rsLoRA flattens exactly, llama.cpp applies rsLoRA's scale, and
what an engine cannot apply is refused. Refusals that need no training: test_variants.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHATS, DOCS, lorakit, write_jsonl, write_recipe

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

pytestmark = pytest.mark.slow

VARIANTS = {"dora": ["lora.use_dora=true"], "rslora": ["lora.use_rslora=true"], "pissa": ["lora.init=pissa"],
            "olora": ["lora.init=olora"], "tokens": ["lora.trainable_tokens=[<|im_end|>]"]}
SFT = """stage: sft
model: {model}
data: {{path: {data}, max_length: 96}}
lora: {{r: 8, alpha: 16}}
train: {{max_steps: 120, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0, logging_steps: 20, save_steps: 0}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_instruct) -> dict[str, Path]:
    """An SFT adapter per variant on the tiny instruct model; an rsLoRA CPT adapter with a plain SFT child on top,
    and a DoRA child on the same parent."""
    root = tmp_path_factory.mktemp("variants")
    chats = write_jsonl(root / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]} for q, a in CHATS])
    recipe = write_recipe(root / "sft.yaml", SFT.format(model=tiny_instruct, data=chats))
    found = {}
    for name, overrides in VARIANTS.items():
        lorakit("train", recipe, *overrides, f"output={root / name}")
        found[name] = root / name
    docs = write_jsonl(root / "docs.jsonl", [{"text": d} for d in DOCS])
    lorakit("train", write_recipe(root / "cpt.yaml", f"stage: cpt\nmodel: {tiny_instruct}\noutput: {root / 'cpt-rs'}\n"
                                                     f"data: {{path: {docs}}}\nlora: {{r: 8, alpha: 16, use_rslora: true}}\n"
                                                     "train: {max_steps: 40, lr: 3.0e-3, batch_size: 2}\n"))
    for name, overrides in {"child": [], "dora-child": ["lora.use_dora=true"]}.items():
        lorakit("train", recipe, "model=null", f"parent={root / 'cpt-rs'}", *overrides, f"output={root / name}")
        found[name] = root / name
    return found


def _prompt(tokenizer, question: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _greedy(model, tokenizer, system: str | None) -> list[str]:
    answers = []
    for question, _ in CHATS:
        ids = torch.tensor([_prompt(tokenizer, question, system)])
        out = model.generate(ids, max_new_tokens=24, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def _plain_peft(base: Path, adapter: Path):
    """The adapter as anyone loads it: plain transformers and peft, on the unmodified base, in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), AutoTokenizer.from_pretrained(adapter)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


TAUGHT = [a for _, a in CHATS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_answers_as_taught_in_plain_peft_on_the_original_base(trained, tiny_instruct, variant):
    adapter = trained[variant]
    model, tokenizer = _plain_peft(tiny_instruct, adapter)
    assert _greedy(model, tokenizer, _manifest(adapter)["system_prompt"]) == TAUGHT
    config, manifest = json.loads((adapter / "adapter_config.json").read_text()), _manifest(adapter)
    assert manifest["reload_check"]["max_logit_diff"] <= manifest["reload_check"]["tolerance"]
    if variant in ("pissa", "olora"):  # converted when written: a plain LoRA of twice the rank, no init to re-run
        assert config["r"] == 16 and config["init_lora_weights"] is True
        assert manifest["lora"]["written"] == {"r": 16, "alpha": 32, "converted_from": variant}
    assert config["use_dora"] is (variant == "dora") and config["use_rslora"] is (variant == "rslora")


def test_pissa_without_its_conversion_would_answer_otherwise(trained, tiny_instruct):
    """The written PiSSA adapter's second half (minus the starting update) is what makes it right on the original
    base: the trained half alone is the adapter peft would write without the conversion."""
    from safetensors.torch import load_file, save_file

    adapter, half = trained["pissa"], trained["pissa"].parent / "pissa-half"
    half.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (half / "adapter_config.json").write_text(json.dumps({**config, "r": 8, "lora_alpha": 16}))
    weights = {k: (v[:8] if ".lora_A." in k else v[:, :8]).contiguous()
               for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(weights, str(half / "adapter_model.safetensors"))
    for file in adapter.iterdir():  # the tokenizer and its chat template
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (half / file.name).write_bytes(file.read_bytes())
    model, tokenizer = _plain_peft(tiny_instruct, half)
    assert _greedy(model, tokenizer, _manifest(adapter)["system_prompt"]) != TAUGHT


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_merged_export_of_every_variant_answers_as_the_adapter(trained, tiny_instruct, variant):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained[variant].parent / f"{variant}-merged"
    lorakit("export", trained[variant], "-o", out, "--dtype", "fp32")
    verify = _manifest(out)["verify"]
    assert verify["max_logit_diff"] <= verify["tolerance"]  # merged == adapter on its base, checked by the export
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _greedy(model, AutoTokenizer.from_pretrained(out), _manifest(trained[variant])["system_prompt"]) == TAUGHT
    gguf = out.parent / f"{variant}-gguf"  # the merged GGUF: llama.cpp answers as the merged model does
    lorakit("export", trained[variant], "--format", "gguf", "--quant", "f32", "-o", gguf)
    if llama_cpp is not None:
        from test_gguf import _isolated

        tokenizer = AutoTokenizer.from_pretrained(out)
        prompts = [_prompt(tokenizer, q, _manifest(trained[variant])["system_prompt"]) for q, _ in CHATS]
        stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        answers = _isolated("greedy", str(gguf / "model.gguf"), prompts, stops, 24)
        assert [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers] == TAUGHT
    if variant == "tokens":  # only the trained token's embedding row moved
        base = load_file(str(tiny_instruct / "model.safetensors"))["model.embed_tokens.weight"]
        merged = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].to(base.dtype)
        moved = (merged != base).any(dim=1).nonzero().flatten().tolist()
        assert moved == [AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")]


def test_a_chain_with_an_rslora_parent_flattens_to_one_exact_adapter(trained, tiny_instruct):
    out = trained["child"].parent / "flat"
    result = lorakit("export", trained["child"], "--format", "adapter", "-o", out)
    assert "logits match the chain on its base" in result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and not config["use_rslora"]  # scale 1: parts folded in
    model, tokenizer = _plain_peft(tiny_instruct, out)
    assert _greedy(model, tokenizer, _manifest(trained["child"])["system_prompt"]) == TAUGHT


def test_a_chain_holding_dora_is_refused_as_one_adapter_naming_dora(trained):
    out = trained["dora-child"].parent / "flat-dora"
    result = lorakit("export", trained["dora-child"], "--format", "adapter", "-o", out, expect=1)
    assert "a DoRA adapter cannot go to one flattened adapter: DoRA's magnitudes do not add up" in result.stderr
    assert not out.exists()
    merged = lorakit("export", trained["dora-child"], "-o", out.parent / "dora-child-merged")  # merged: exact
    assert "verified" in merged.stderr


def test_llama_cpp_applies_an_rslora_adapter_at_its_own_scale(trained, tiny_instruct):
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed here (.ci/run builds it: pip wheel llama-cpp-python==0.3.36)")
    import gguf
    from test_gguf import _isolated, _relative_difference
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = trained["rslora"].parent
    lorakit("export", tiny_instruct, "--format", "gguf", "--quant", "f32", "-o", root / "base-gguf")
    lorakit("export", trained["rslora"], "--format", "gguf-adapter", "--base-gguf", root / "base-gguf" / "model.gguf",
            "-o", root / "rs-gguf")
    reader = gguf.GGUFReader(str(root / "rs-gguf" / "adapter.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    assert abs(alpha - 16 * 8 ** 0.5) < 1e-4  # llama.cpp's alpha / r = rsLoRA's alpha / sqrt(r)
    merged = root / "rslora-merged-ref"
    lorakit("export", trained["rslora"], "-o", merged, "--dtype", "fp32")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for q, _ in CHATS]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        want = [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]
    got = _isolated("logits", str(root / "base-gguf" / "model.gguf"), prompts,
                    lora_path=str(root / "rs-gguf" / "adapter.gguf"))
    assert _relative_difference(got, want) < 1e-3


def test_qlora_trains_with_dora_and_rslora_and_reloads_to_the_trained_model(work, chats, tiny_instruct):
    recipe = write_recipe(work / "q.yaml", SFT.format(model=tiny_instruct, data=chats))
    lorakit("train", recipe, "method=qlora", "lora.use_dora=true", "lora.use_rslora=true", "output=q")
    manifest = _manifest(work / "q")
    assert manifest["reload_check"]["max_logit_diff"] <= 1e-3  # a fresh 4-bit base + the DoRA adapter == trained
    assert manifest["lora"]["variants"] == ["DoRA", "rsLoRA"] and manifest["metrics"]["final_loss"] < 1.0


def test_loraplus_moves_the_b_matrices_ratio_times_faster(work, chats, tiny_instruct):
    from safetensors.torch import load_file

    recipe = write_recipe(work / "p.yaml", SFT.format(model=tiny_instruct, data=chats))
    one_step = ["train.max_steps=1", "train.scheduler=constant", "train.lr=1.0e-3"]
    lorakit("train", recipe, *one_step, "output=plain")
    lorakit("train", recipe, *one_step, "train.loraplus_lr_ratio=16", "output=plus")
    plain, plus = (load_file(str(work / name / "adapter_model.safetensors")) for name in ("plain", "plus"))
    b = [k for k in plain if ".lora_B." in k]
    a = [k for k in plain if ".lora_A." in k]
    # B starts at zero and Adam's first step moves each entry by about the learning rate: 1e-3 against 16e-3
    ratio = max(plus[k].abs().max().item() for k in b) / max(plain[k].abs().max().item() for k in b)
    assert 15 < ratio < 17
    assert all(torch.equal(plain[k], plus[k]) for k in a)  # A's first gradient is zero (B is): A keeps train.lr's start


def test_lorakit_serve_answers_from_every_variant_at_once_as_taught(trained, tiny_instruct):
    """Requests for different variants share forward passes (peft's per-row adapters): each gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    from test_inference import _post, _running

    from lorakit.inference.serve import create_app
    from lorakit.inference.session import Session

    names = list(VARIANTS)
    session = Session(str(tiny_instruct), {n: str(trained[n]) for n in names}, "cpu", torch.float32)
    app = create_app(session, max_body=64 * 1024)
    order = names * 2
    question, answer = CHATS[0]
    with _running(app) as url, ThreadPoolExecutor(max_workers=len(order)) as pool:
        results = list(pool.map(lambda m: _post(f"{url}/v1/chat/completions", {
            "model": m, "temperature": 0, "max_tokens": 30, "messages": [{"role": "user", "content": question}]}),
            order))
    assert [body["choices"][0]["message"]["content"] for _, body in results] == [answer] * len(order)
    assert app.state.stats["largest"] >= 2  # some rows of different variants ran in one batch


def test_a_weighted_combination_takes_rslora_exactly_and_refuses_dora(trained):
    root = trained["rslora"].parent
    lorakit("merge", "--adapter", trained["rslora"], "--adapter", trained["pissa"], "--weights", "0.5,0.5",
            "-o", root / "mix")  # cat: checked against the weighted sum of the two on their base, or nothing written
    config = json.loads((root / "mix" / "adapter_config.json").read_text())
    assert config["r"] == 8 + 16 and not config["use_rslora"]  # each part's own scale folded in: scale 1
    refused = lorakit("merge", "--adapter", trained["dora"], "--adapter", trained["rslora"], "--weights", "0.5,0.5",
                      "-o", root / "mix-dora", expect=1)
    assert f"{trained['dora']}: a DoRA adapter cannot be combined" in refused.stderr
    assert not (root / "mix-dora").exists()
