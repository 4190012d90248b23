"""QLoRA (4-bit and 8-bit bases) and full fine-tuning, on CPU with tiny models."""

import json

import pytest
import torch
from conftest import DOCS, load_metrics, lorakit, write_recipe
from safetensors.torch import load_file

import lorakit.training.run as run_module
from lorakit.errors import LorakitError

RECIPE = """stage: cpt
model: {model}
method: {method}
data: {{path: {data}, max_length: 64}}
lora: {{r: 16, alpha: 32, dropout: 0.0}}
train: {{max_steps: {steps}, lr: {lr}, batch_size: 2, warmup_ratio: 0.0, logging_steps: 10}}
"""
PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 12]])


def _train(work, corpus, model, method, steps=150, lr="3.0e-3", extra=()):
    text = RECIPE.format(model=model, method=method, data=corpus, steps=steps, lr=lr)
    lorakit("train", write_recipe(work / f"{method}.yaml", text), *extra)
    return work / "adapters" / method


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_lowers_the_loss_and_reloads_on_a_fresh_quantized_base(work, corpus, tiny_base, bits):
    adapter = _train(work, corpus, tiny_base, "qlora", extra=[f"quant.bits={bits}", "train.dtype=fp32"])
    metrics = load_metrics(adapter)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["method"] == "qlora" and manifest["quantization"]["bits"] == bits
    assert manifest["reload_check"]["max_logit_diff"] <= 1e-3  # a fresh quantized base + adapter == trained
    if bits == 4:
        assert manifest["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    continued = lorakit("generate", "--adapter", adapter, "--greedy", "--max-new-tokens", "30", "The Orbix lamp").stdout
    assert continued.startswith(DOCS[0][:50]), continued


@pytest.mark.slow
def test_4bit_base_survives_evaluate_then_train_then_merge(tiny_base):
    """The bitsandbytes CPU repacking hazard: an eval forward without gradients first, then training,
    then a merge that must equal the 4-bit model plus adapter."""
    from lorakit.recipe import (
        DataSettings,
        LoraSettings,
        QuantSettings,
        Recipe,
        TrainSettings,
    )
    from lorakit.weights.export import merged_model
    from lorakit.weights.loading import load_model, make_trainable
    from lorakit.weights.manifest import Manifest
    from lorakit.weights.quant import quantization_of

    quantization = quantization_of(QuantSettings(), torch.float32)
    model = load_model(str(tiny_base), torch.float32, "cpu", quantization=quantization)
    with torch.no_grad():
        model(input_ids=PROBE)  # evaluate first: this is what repacked the weights in place
    recipe = Recipe(stage="cpt", data=DataSettings(path="unused"), model=str(tiny_base), method="qlora",
                    lora=LoraSettings(dropout=0.0), train=TrainSettings(seed=0))
    model = make_trainable(model, recipe, quantized=True).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # failed with "a view of a leaf Variable ... in-place operation" before the fix
        model(input_ids=PROBE, labels=PROBE).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=PROBE).logits
    folder = tiny_base.parent / "qlora-hazard"
    model.save_pretrained(folder)
    Manifest(kind="adapter", base_model=str(tiny_base), quantization=quantization).write(folder)
    with torch.no_grad():
        merged = merged_model(str(folder), "cpu", torch.float32)[0](input_ids=PROBE).logits
        original = merged_model(str(folder), "cpu", torch.float32, onto="original")[0](input_ids=PROBE).logits
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=1e-4)
    assert (original - trained).abs().max() > 1e-3  # the original weights are not what it trained on


@pytest.mark.slow
def test_the_cpu_repacking_hazard_is_real_without_the_fix(tiny_base):
    """Keeps the test above honest: plain loading on this CPU does break training after an eval."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes does not repack here")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_base, device_map="cpu", dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with torch.no_grad():
        model(input_ids=PROBE)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear")).train()
    with pytest.raises(RuntimeError, match="in-place operation"):
        model(input_ids=PROBE, labels=PROBE).loss.backward()


@pytest.mark.slow
def test_full_fine_tune_changes_every_weight_and_writes_a_plain_model_folder(work, corpus, tiny_base):
    model = _train(work, corpus, tiny_base, "full", steps=60, lr="1.0e-3", extra=[])
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "manifest.json",
            "recipe.yaml", "loss.png"} <= {p.name for p in model.iterdir()}
    before, after = load_file(tiny_base / "model.safetensors"), load_file(model / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model)  # plain transformers, no lorakit
    for flag in ("--model", "--adapter"):  # every command taking a model or an adapter takes it
        out = lorakit("generate", flag, model, "--greedy", "--max-new-tokens", "30", "The Orbix lamp").stdout
        assert out.startswith(DOCS[0][:50]), out
    assert "total:" in lorakit("inspect", model).stdout


@pytest.mark.slow
def test_the_full_flag_is_method_full(work, corpus, tiny_base):
    text = RECIPE.format(model=tiny_base, method="lora", data=corpus, steps=3, lr="1.0e-3")
    out = lorakit("train", write_recipe(work / "f.yaml", text), "--full").stdout
    assert "model written to adapters/f" in out
    assert json.loads((work / "adapters" / "f" / "manifest.json").read_text())["method"] == "full"


@pytest.mark.slow
def test_a_save_that_does_not_reproduce_the_trained_model_is_never_published(work, corpus, tiny_base, monkeypatch):
    import lorakit.weights.folders as adapters

    real = adapters.write_adapter

    def broken(staging, *args):
        real(staging, *args)
        weights = load_file(staging / "adapter_model.safetensors")
        from safetensors.torch import save_file
        save_file({k: torch.zeros_like(v) for k, v in weights.items()}, staging / "adapter_model.safetensors")

    monkeypatch.setattr(run_module, "write_adapter", broken)
    text = RECIPE.format(model=tiny_base, method="lora", data=corpus, steps=20, lr="3.0e-3")
    result = lorakit("train", write_recipe(work / "b.yaml", text), expect=1)
    assert "logits differ by" in result.stderr and "not kept" in result.stderr
    assert [p.name for p in (work / "adapters").iterdir()] == [".b.run"]  # the trained checkpoint, for --resume


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    import builtins

    from lorakit.weights.quant import require_bitsandbytes

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(LorakitError, match="pip install bitsandbytes"):
        require_bitsandbytes()


@pytest.mark.slow
def test_a_full_chat_fine_tune_is_as_deployable_as_an_export(work, tiny_base):
    """On a base model (EOS <|endoftext|>), a chat SFT full fine-tune must stop at <|im_end|> in plain
    transformers, and say the dtype its weights are written in."""
    from conftest import CHATS, write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chats = write_jsonl(work / "c.jsonl", [{"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]} for q, a in CHATS])
    recipe = write_recipe(work / "chat.yaml", f"stage: sft\nmodel: {tiny_base}\nmethod: full\n"
                                              f"data: {{path: {chats}, max_length: 96}}\ntrain: {{max_steps: 2}}\n")
    result = lorakit("train", recipe)
    folder = work / "adapters" / "chat"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == manifest["trained_on"]["dtype"]
    assert f"the model's weights are written in {manifest['dtype']}; it stops at <|im_end|>" in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id[0] == end and model.config.eos_token_id == end
    assert str(next(model.parameters()).dtype) == f"torch.{manifest['dtype']}"


@pytest.mark.slow
def test_a_4bit_base_for_fsdp_is_stored_in_the_compute_dtype_and_computes_the_same(tiny_base):
    """FSDP shards flat tensors of one dtype: with strategy fsdp the 4-bit weights are packed into the compute dtype
    (bnb_4bit_quant_storage, as LLaMA-Factory, axolotl and TRL set it) instead of uint8, and the model they make
    computes what the uint8 one does."""
    import bitsandbytes as bnb

    from lorakit.recipe import DataSettings, Recipe, TrainSettings
    from lorakit.weights.loading import load_model
    from lorakit.weights.quant import quantization_for

    logits, stored = {}, {}
    for strategy in ("ddp", "fsdp"):
        recipe = Recipe(stage="cpt", data=DataSettings(path="unused"), model=str(tiny_base), method="qlora",
                        train=TrainSettings(strategy=strategy))
        quantization = quantization_for(recipe, torch.float32)
        model = load_model(str(tiny_base), torch.float32, "cpu", quantization=quantization)
        stored[strategy] = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        with torch.no_grad():
            logits[strategy] = model(input_ids=PROBE).logits
    assert stored == {"ddp": {torch.uint8}, "fsdp": {torch.float32}}
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], atol=1e-5, rtol=1e-5)
