"""`lorakit plan`: the peak memory of a run, part by part, from the config alone."""

import re

from conftest import lorakit, write_recipe

import lorakit.training.plan as plan_module
from lorakit.training.plan import Shape, estimate, lora_params, parse_size, total


def test_parameter_counts_match_the_model(tiny_base):
    from transformers import AutoModelForCausalLM

    from lorakit.recipe import LoraSettings
    from lorakit.weights.loading import attach_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    shape = Shape.of(model.config)
    assert shape.params == model.num_parameters()
    peft_model = attach_lora(model, LoraSettings(r=8), seed=0)
    assert lora_params(shape, 8, "all-linear") == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_the_plan_grows_with_the_work_and_checkpointing_saves_memory():
    from transformers import Qwen2Config

    from lorakit.demo.tiny import QWEN2_0_5B_SHAPE

    config = Qwen2Config(**QWEN2_0_5B_SHAPE, tie_word_embeddings=True)
    assert QWEN2_0_5B_SHAPE["hidden_size"] == config.hidden_size
    shape = Shape.of(config)
    assert 490e6 < shape.params < 500e6  # Qwen2-0.5B: 494M
    import torch

    def peak(**kw):
        args = dict(method="lora", bits=4, r=16, target="all-linear", dtype=torch.bfloat16, device="cpu", batch=1,
                    seq=512, checkpointing=False)
        return total(estimate(shape, **{**args, **kw}))

    assert peak(seq=1024) > peak(seq=512) and peak(batch=2) > peak()
    assert peak(checkpointing=True) < peak()
    assert peak(method="qlora") < peak(method="lora", dtype=torch.float32) < peak(method="full", dtype=torch.float32)


def test_plan_command_reports_parts_and_what_fits_a_budget(work, corpus, tiny_base):
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: {corpus}}}\n")
    out = lorakit("plan", recipe, "--budget", "8GB").stdout
    for part in ("base weights", "trainable parameters", "gradients + AdamW state", "activations", "logits",
                 "expected peak", "without / with activation checkpointing", "budget 8.00 GiB: fits"):
        assert part in out, out
    small = lorakit("plan", recipe, "--budget", "1MB").stdout
    assert "does NOT fit" in small and "at most 0 rows" in small
    assert parse_size("512MB") == 512 * 2**20 and parse_size("8GiB") == 8 * 2**30


def test_train_warns_when_the_plan_exceeds_free_memory(work, corpus, tiny_base, monkeypatch):
    monkeypatch.setattr(plan_module, "free_memory", lambda device: 1024.0)
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: {corpus}}}\n"
                                           f"train: {{max_steps: 1}}\n")
    result = lorakit("train", recipe)
    assert "warning: this run is planned to peak at" in result.stderr and "lorakit plan" in result.stderr


def test_plan_per_process_shards_weights_and_optimizer_under_fsdp_and_zero3(work, corpus):
    """`lorakit plan --nproc N`: each process's peak under ddp (all of it, plus gradient buckets) and under
    fsdp/zero3 (weights, gradients and AdamW state divided among the processes), and which fit a budget."""
    from transformers import Qwen2Config

    from lorakit.demo.tiny import QWEN2_0_5B_SHAPE

    Qwen2Config(**QWEN2_0_5B_SHAPE, tie_word_embeddings=True).save_pretrained(work / "qwen2-0.5b")
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {work / 'qwen2-0.5b'}\nmethod: full\n"
                                           f"data: {{path: {corpus}, max_length: 512}}\ntrain: {{dtype: bf16}}\n")
    figures = {}
    for nproc in (2, 8):
        out = lorakit("plan", recipe, "--device", "cuda", "--nproc", str(nproc)).stdout
        figures[nproc] = {m[1]: float(m[2]) for m in re.finditer(r"^  (ddp|fsdp|zero3) .* ([\d.]+) GiB", out, re.M)}
        assert sorted(figures[nproc]) == ["ddp", "fsdp", "zero3"], out
    assert figures[2]["ddp"] == figures[8]["ddp"]  # every process holds everything, however many there are
    assert figures[8]["fsdp"] < figures[2]["fsdp"] < figures[2]["ddp"] and figures[8]["fsdp"] == figures[8]["zero3"]
    # full fine-tune, bf16: 16 bytes per parameter (fp32 weights, bf16 copy, gradient, AdamW) less the shared parts
    assert figures[2]["ddp"] - figures[2]["fsdp"] > 3  # GiB: half of ~7 GiB of sharded state, minus what is gathered
    budget = (figures[8]["fsdp"] + figures[8]["ddp"]) / 2
    out = lorakit("plan", recipe, "--device", "cuda", "--nproc", "8", "--budget", f"{budget:.2f}GB").stdout
    assert f"budget {budget:.2f} GiB per process: fits with train.strategy fsdp, zero3; not with ddp" in out, out
