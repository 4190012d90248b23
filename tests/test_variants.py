"""LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA, trainable tokens, LoRA+): switched on by one key each; a combination
that could not be written or served faithfully is refused in one line, naming the variant, before any work.
What trains: test_variant_training.py."""

from __future__ import annotations

import json

import pytest
from conftest import lorakit, write_recipe

from lorakit.training.plan import Shape, estimate, lora_params, total

RECIPE = "stage: sft\nmodel: {model}\ndata: {{path: {data}, max_length: 96}}\ntrain: {{max_steps: 2}}\n"


@pytest.mark.parametrize("override, message", [
    ("lora.init=eva", "lora.init eva: not offered by lorakit, as it needs the training data's activations"),
    ("lora.init=loftq", "lora.init loftq: not offered by lorakit, as it quantizes the base itself"),
    ("lora.init=pisa", "lora.init 'pisa': expected one of default, gaussian, orthogonal, pissa, olora or pissa_niter_<n>"),
    ("lora.r=7 lora.init=orthogonal", "lora.init orthogonal needs an even lora.r, got 7"),
    ("method=full lora.use_dora=true", "DoRA: LoRA variants apply to method lora and qlora"),
    ("method=full train.loraplus_lr_ratio=16", "LoRA+: LoRA variants apply to method lora and qlora"),
    ("train.loraplus_lr_ratio=0.5", "train.loraplus_lr_ratio must be at least 1"),
    ("train.loraplus_lr_ratio=16 train.strategy=fsdp", "train.loraplus_lr_ratio with strategy fsdp"),
    ("lora.trainable_tokens=[a,a]", "lora.trainable_tokens ['a', 'a']: name each token once"),
    ("use_dora=true", "lorakit calls it lora.use_dora"),
    ("lora.pissa_init=true", "lorakit calls it lora.init: pissa"),
    ("lora.modules_to_save=[embed_tokens]", "lorakit calls it lora.trainable_tokens (for tokens) or method: full"),
    ("lora.target=[embed_tokens]", "to train a few tokens' embeddings use lora.trainable_tokens"),
])
def test_a_bad_variant_setting_is_one_line_naming_the_key(work, chats, override, message):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model="m", data=chats))
    result = lorakit("train", recipe, *override.split(), expect=1)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, message", [
    ("method=qlora lora.init=pissa", "lora.init pissa with method: qlora: pissa moves part of each weight into the "
                                     "adapter while training"),
    ("lora.init=olora lora.use_dora=true", "lora.init olora with lora.use_dora: DoRA's magnitudes are measured on the "
                                           "rewritten base"),
    ("lora.init=pissa_niter_4 lora.trainable_tokens=[<|im_end|>]", "peft's conversion back to the original base "
                                                                   "keeps only the LoRA matrices"),
    ("stage=dpo lora.init=pissa", "the reference model is the base with the adapter switched off, which pissa has "
                                  "rewritten"),
    ("method=qlora lora.init=orthogonal", "lora.init orthogonal with method: qlora: peft makes A and B in the dtype"),
    ("lora.trainable_tokens=[<|nope|>]", "lora.trainable_tokens '<|nope|>' is not a token of this tokenizer's "
                                          "vocabulary"),
])
def test_a_variant_whose_adapter_could_not_mean_what_was_trained_is_refused_before_training(
        work, chats, tiny_instruct, override, message):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_instruct, data=chats))
    result = lorakit("train", recipe, *override.split(), expect=1)
    assert message in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (work / "adapters").exists() or not any((work / "adapters").iterdir())


def _adapter(folder, **config):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                            **config}))
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(8, 4)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("config, variant", [({"use_dora": True}, "DoRA"),
                                             ({"trainable_token_indices": [3]}, "trainable tokens"),
                                             ({"modules_to_save": ["lm_head"]}, "modules_to_save")])
def test_what_vllm_and_llama_cpp_cannot_apply_is_refused_naming_the_variant_and_what_to_do(work, config, variant):
    adapter = _adapter(work / "a", **config)
    vllm = lorakit("serve", "--engine", "vllm", "--adapter", adapter, "--vllm", "/no/such/vllm", expect=1)
    assert f"{adapter}: a {variant} adapter cannot go to vLLM" in vllm.stderr  # before vLLM is even looked for
    assert "export it merged" in vllm.stderr
    gguf = lorakit("export", adapter, "--format", "gguf-adapter", "-o", work / "out", expect=1)
    assert f"a {variant} adapter cannot go to llama.cpp's GGUF adapter" in gguf.stderr
    assert "--format gguf" in gguf.stderr and not (work / "out").exists()


def test_rslora_is_served_everywhere_with_its_own_scale():
    from lorakit.weights.variants import UNSUPPORTED, scale, variants_of

    config = {"r": 16, "lora_alpha": 32, "use_rslora": True}
    assert variants_of(config) == ["rsLoRA"] and scale(config) == 8.0  # alpha / sqrt(r), not alpha / r = 2
    assert all("rsLoRA" not in refused for refused in UNSUPPORTED.values())


def test_plan_counts_doras_magnitudes_and_the_trained_token_rows_as_peft_makes_them(tiny_base, tokenizer_ids):
    from transformers import AutoModelForCausalLM

    from lorakit.recipe import LoraSettings
    from lorakit.weights.loading import attach_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    shape = Shape.of(model.config)
    peft_model = attach_lora(model, LoraSettings(r=8, use_dora=True), seed=0, token_ids=tokenizer_ids)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape, 8, "all-linear", dora=True, token_rows=len(tokenizer_ids)) == trainable
    assert trainable > lora_params(shape, 8, "all-linear")


def test_plan_shows_what_dora_and_trainable_tokens_cost_on_the_qwen2_shape():
    import torch
    from transformers import Qwen2Config

    from lorakit.demo.tiny import QWEN2_0_5B_SHAPE

    shape = Shape.of(Qwen2Config(**QWEN2_0_5B_SHAPE, tie_word_embeddings=True))
    args = dict(method="lora", bits=4, r=16, target="all-linear", dtype=torch.bfloat16, device="cpu", batch=1,
                seq=1024, checkpointing=False)
    plain, dora, tokens = (estimate(shape, **args), estimate(shape, **args, dora=True),
                           estimate(shape, **args, token_rows=2))
    outputs = 896 + 128 + 128 + 896 + 4864 + 4864 + 896  # q, k, v, o, gate, up, down: one magnitude per row
    assert dora["_trainable_params"] - plain["_trainable_params"] == 24 * outputs
    assert dora["activations"] > plain["activations"] and total(dora) > total(plain)
    assert tokens["_trainable_params"] - plain["_trainable_params"] == 2 * 896
    assert total(tokens) - total(plain) > 2 * 151936 * 896 * 2  # the rebuilt embedding and the head's gradient


@pytest.fixture
def tokenizer_ids():
    return [3, 5]


@pytest.mark.parametrize("config, answers", [
    ({}, {"vllm": "yes", "llama.cpp": "yes", "ollama": "yes", "peft": "yes"}),
    ({"use_rslora": True}, {"vllm": "yes", "llama.cpp": "yes", "ollama": "yes", "peft": "yes"}),
    ({"use_dora": True}, {"vllm": "no: {a}: a DoRA adapter cannot go to vLLM", "llama.cpp": "no: {a}: a DoRA adapter "
                          "cannot go to llama.cpp's GGUF adapter", "ollama": "no: {a}: a DoRA", "peft": "yes"}),
    ({"trainable_token_indices": [3]}, {"vllm": "no: {a}: a trainable tokens adapter cannot go to vLLM",
                                        "peft": "yes"}),
    ({"r": 600}, {"vllm": "no: {a}: rank 600 is above the server's --max-lora-rank 512", "llama.cpp": "yes"}),
])
def test_check_says_which_engine_can_apply_an_adapter_and_why_not(work, config, answers):
    adapter = _adapter(work / "a", **config)
    args = [arg for engine in answers for arg in ("--for", engine)]
    refused = any(a.startswith("no") for a in answers.values())
    result = lorakit("check", adapter, *args, expect=1 if refused else 0)
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    for engine, answer in answers.items():
        assert f"{engine}: {lines[engine]}".startswith(f"{engine}: {answer.format(a=adapter)}"), result.stdout


def test_check_takes_the_servers_rank_limit(work):
    adapter = _adapter(work / "a", r=128)
    assert "above the server's --max-lora-rank 64" in lorakit("check", adapter, "--for", "vllm", "--max-lora-rank",
                                                              "64", expect=1).stdout


def test_a_recipe_meant_for_vllm_warns_before_training_a_dora_adapter(work, chats, tiny_instruct):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_instruct, data=chats))
    result = lorakit("train", recipe, "serve_with=[vllm]", "lora.use_dora=true", "lora.init=pissa", "method=qlora",
                     expect=1)  # refused for the qlora + pissa pair, after the warning: nothing trained
    assert "warning: serve_with vllm: this recipe trains a DoRA adapter, and vLLM cannot apply it" in result.stderr
    bad = lorakit("train", recipe, "serve_with=[tgi]", expect=1)
    assert "serve_with 'tgi': expected some of vllm, llama.cpp, ollama, peft" in bad.stderr
