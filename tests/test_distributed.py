"""Beyond one device: 2-process DDP on CPU (gloo) through torchrun, checked against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import lorakit, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains a model

RECIPE = """stage: cpt
model: {model}
output: adapters/{name}
data: {{path: {data}, max_length: 16}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
train: {{max_steps: 12, lr: 3.0e-3, batch_size: {batch}, warmup_ratio: 0.0, logging_steps: 1, save_steps: 0, seed: 3,
         dtype: fp32}}
"""


def _run(work, *args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)


def _losses(adapter):
    return [m["loss"] for m in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_two_processes_train_like_one_with_the_same_global_batch(work, corpus, tiny_base):
    two = write_recipe(work / "two.yaml", RECIPE.format(model=tiny_base, name="two", data=corpus, batch=1))
    one = write_recipe(work / "one.yaml", RECIPE.format(model=tiny_base, name="one", data=corpus, batch=2))
    result = _run(work, "train", two, "--nproc", "2", "data.cache_dir=cache")
    assert result.returncode == 0, result.stderr
    # the data was tokenized once, by rank 0; rank 1 read the same cache entry
    assert result.stderr.count("data: tokenizing") == 1
    assert [p.name for p in (work / "cache").iterdir() if not p.name.endswith(".lock")] == [
        next(p.name for p in (work / "cache").iterdir() if p.is_dir())]
    assert "world size 2: global batch 1 rows x 1 accumulation x 2 processes = 2 rows per step (ddp)" in result.stderr
    assert "all 2 processes hold the same trained weights" in result.stderr
    assert result.stdout.count("adapter written to adapters/two") == 1
    assert sorted(p.name for p in (work / "adapters").iterdir()) == ["two"]  # rank 0 alone wrote
    assert _run(work, "train", one).returncode == 0
    ddp, single = _losses(work / "adapters" / "two"), _losses(work / "adapters" / "one")
    assert len(ddp) == len(single) == 12 and ddp[-1] < ddp[0]
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 0.05, (ddp, single)
    a = load_file(work / "adapters" / "two" / "adapter_model.safetensors")
    b = load_file(work / "adapters" / "one" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=2e-3) for k in a)
    tokens = [json.loads(line) for line in (work / "adapters" / "two" / "metrics.jsonl").read_text().splitlines()]
    single_tokens = [json.loads(line) for line in (work / "adapters" / "one" / "metrics.jsonl").read_text().splitlines()]
    assert tokens[-1]["tokens"] == single_tokens[-1]["tokens"]  # the count covers both processes


def test_a_run_that_asked_for_two_processes_but_got_one_is_refused(work, corpus, tiny_base):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_base, name="r", data=corpus, batch=1))
    result = _run(work, "train", recipe, env={"LORAKIT_EXPECTED_WORLD_SIZE": "2"})
    assert result.returncode == 1
    assert "2 processes were asked for, but this run has 1" in result.stderr.strip().splitlines()[-1]


def test_fsdp_on_cpus_is_refused_before_any_process_starts(work, corpus, tiny_base):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_base, name="r", data=corpus, batch=1))
    result = lorakit("train", recipe, "--nproc", "2", "train.strategy=fsdp", expect=1)
    assert "train.strategy fsdp needs GPUs; on CPUs use strategy: ddp" in result.stderr
