"""Beyond one device: 2-process DDP on CPU (gloo) through torchrun, checked against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _same_training(two: Path, one: Path, steps: int) -> None:
    """Two adapters trained on the same global batch: the loss curve of one (each step within 0.05) and its weights
    (within 2e-3)."""
    sharded, single = _losses(two), _losses(one)
    assert len(sharded) == len(single) == steps and sharded[-1] < sharded[0]
    assert max(abs(a - b) for a, b in zip(sharded, single)) < 0.05, (sharded, single)
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-3) for k in a)


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
    _same_training(work / "adapters" / "two", work / "adapters" / "one", 12)
    tokens = [json.loads(line) for line in (work / "adapters" / "two" / "metrics.jsonl").read_text().splitlines()]
    single_tokens = [json.loads(line) for line in (work / "adapters" / "one" / "metrics.jsonl").read_text().splitlines()]
    assert tokens[-1]["tokens"] == single_tokens[-1]["tokens"]  # the count covers both processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(folders, recipe: str, port: int, *extra) -> list[subprocess.Popen]:
    """One torchrun per "machine": each in its own working folder, meeting over loopback (static rendezvous)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(folders)),
                              "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                              "--master_port", str(port), "-m", "lorakit", "train", recipe, *extra],
                             cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for rank, folder in enumerate(folders)]


def _files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_two_machines_with_their_own_disks_train_like_one_process(tmp_path, corpus, tiny_base):
    """torchrun --nnodes 2 over loopback, each node in its own folder with its own data cache: each node prepares
    its own data (none waits for a folder the other writes), node 0 alone writes the adapter, and the loss curve
    is one process's with the same global batch."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
        write_recipe(folder / "r.yaml", RECIPE.format(model=tiny_base, name="two", data=corpus, batch=1)
                     .replace("max_length: 16}", "max_length: 16, cache_dir: cache}"))
    nodes = _nodes(folders, "r.yaml", _free_port())
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert "world size 2: global batch 1 rows x 1 accumulation x 2 processes = 2 rows per step (ddp)" in outputs[0][1]
    assert [sum(p.is_dir() for p in (f / "cache").iterdir()) for f in folders] == [1, 1]  # each node's own entry
    assert (folders[0] / "adapters" / "two" / "adapter_model.safetensors").is_file()
    assert _files(folders[1] / "adapters") == []  # global rank 0 alone wrote; node 1's checkpoints went at the end
    single = folders[0] / "one.yaml"
    write_recipe(single, RECIPE.format(model=tiny_base, name="one", data=corpus, batch=2))
    assert _run(folders[0], "train", single).returncode == 0
    _same_training(folders[0] / "adapters" / "two", folders[0] / "adapters" / "one", 12)


def test_a_machine_that_dies_ends_the_run_in_one_line_and_both_resume_from_their_own_disks(tmp_path, corpus, tiny_base):
    """Node 1 killed outright after its first checkpoint: node 0 ends with one line and writes no adapter; both
    nodes started again with --resume go on from the checkpoint each kept on its own disk, to the curve and the
    adapter of one uninterrupted process."""
    import time

    import psutil

    folders = [tmp_path / "node0", tmp_path / "node1"]
    recipe = RECIPE.replace("max_steps: 12", "max_steps: 200").replace("save_steps: 0", "save_steps: 10")
    for folder in folders:
        folder.mkdir()
        write_recipe(folder / "r.yaml", recipe.format(model=tiny_base, name="two", data=corpus, batch=1)
                     .replace("max_length: 16}", "max_length: 16, cache_dir: cache}"))
    nodes = _nodes(folders, "r.yaml", _free_port())
    kept = folders[1] / "adapters" / ".two.run" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 300
    while not kept.is_file():  # node 1's own copy of the checkpoint
        assert nodes[1].poll() is None and time.time() < deadline, nodes[1].communicate()[1][-3000:]
        time.sleep(0.01)
    machine = psutil.Process(nodes[1].pid)
    for process in [machine, *machine.children(recursive=True)]:  # torchrun and its worker (a session of its own)
        process.kill()
    nodes[1].wait()
    _, err = nodes[0].communicate(timeout=300)
    said = [line for line in err.splitlines() if line.startswith("error: ")]
    assert nodes[0].returncode != 0 and len(said) == 1, err[-3000:]
    assert "another process of this run stopped answering at step" in said[0] and "--resume" in said[0]
    assert not (folders[0] / "adapters" / "two").exists()  # nothing half written
    again = _nodes(folders, "r.yaml", _free_port(), "--resume")
    outputs = [node.communicate(timeout=600) for node in again]
    assert [node.returncode for node in again] == [0, 0], [e[-3000:] for _, e in outputs]
    assert "resuming from" in outputs[0][1]
    write_recipe(folders[0] / "one.yaml", recipe.format(model=tiny_base, name="one", data=corpus, batch=2))
    assert _run(folders[0], "train", folders[0] / "one.yaml").returncode == 0
    _same_training(folders[0] / "adapters" / "two", folders[0] / "adapters" / "one", 200)
    assert _files(folders[1] / "adapters") == []


def test_lorakits_fsdp_settings_shard_and_train_like_one_process(tmp_path, tiny_base):
    """accelerate runs FSDP only on GPUs, so lorakit's FSDP settings (training.sharding.fsdp_config, the very dict
    the Trainer gets) are applied here with torch's fully_shard over gloo on 2 CPU processes: every decoder layer
    is a unit holding its frozen base weights and its LoRA, both sharded; the loss curve is one process's within
    1e-3; the full state dict gathered for saving is an adapter plain peft loads, with one process's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    worker = Path(__file__).parent / "fsdp_worker.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"])):
        done = subprocess.run([sys.executable, *launcher, str(worker), str(tiny_base), str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    layers = AutoModelForCausalLM.from_pretrained(tiny_base).config.num_hidden_layers
    assert sorted(two["units"]) == ["FSDPPeftModel"] + ["FSDPQwen2DecoderLayer"] * layers
    assert two["trainable_sharded"] and two["frozen_sharded"] and two["frozen_still_frozen"] > 0
    assert one["losses"][-1] < one["losses"][0] - 1  # it trained
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-3, (one, two)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    logits = []
    for name in ("one", "two"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / name)
        with torch.no_grad():
            logits.append(model(ids).logits)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_base)(ids).logits
    assert (logits[0] - base).abs().max() > 0.1  # the adapter changes the answer...
    assert torch.allclose(logits[0], logits[1], atol=1e-4)  # ...and the sharded run's is the same adapter


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_zero_on_two_cpu_processes_trains_like_one(work, corpus, tiny_base, strategy):
    """DeepSpeed's CPU accelerator runs ZeRO-2 and ZeRO-3 over gloo through the Trainer: the loss curve and the
    adapter of one process with the same global batch; under ZeRO-3 the partitioned weights are gathered so that
    rank 0 proves the written adapter reproduces the trained logits."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here (.ci/run installs it)")
    two = write_recipe(work / "two.yaml", RECIPE.format(model=tiny_base, name="two", data=corpus, batch=1))
    one = write_recipe(work / "one.yaml", RECIPE.format(model=tiny_base, name="one", data=corpus, batch=2))
    result = _run(work, "train", two, "--nproc", "2", f"train.strategy={strategy}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 processes = 2 rows per step ({strategy})" in result.stderr
    assert "reload check: written weights reproduce the trained logits" in result.stderr
    assert _run(work, "train", one).returncode == 0
    _same_training(work / "adapters" / "two", work / "adapters" / "one", 12)


def test_a_run_that_asked_for_two_processes_but_got_one_is_refused(work, corpus, tiny_base):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_base, name="r", data=corpus, batch=1))
    result = _run(work, "train", recipe, env={"LORAKIT_EXPECTED_WORLD_SIZE": "2"})
    assert result.returncode == 1
    assert "2 processes were asked for, but this run has 1" in result.stderr.strip().splitlines()[-1]


def test_bad_data_under_nproc_is_one_line_from_the_process_that_found_it_and_writes_nothing(work, tiny_base):
    """torchrun's own report (the agent's SIGTERM notes, a ChildFailedError traceback and table) used to follow
    lorakit's line."""
    (work / "d.jsonl").write_text('{"text": "the Orbix lamp glows amber"}\n{"txt": "no text field"}\n')
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_base, name="r", data=work / "d.jsonl", batch=1))
    result = _run(work, "train", recipe, "--nproc", "2")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: {work / 'd.jsonl'} line 2: no `text` field (CPT records look like {{\"text\": \"...\"}})"]
    assert "ChildFailedError" not in result.stderr and "SIGTERM" not in result.stderr
    assert list(work.glob("adapters/**/*")) == []  # no adapter, no partial, no run folder


def test_fsdp_on_cpus_is_refused_before_any_process_starts(work, corpus, tiny_base):
    recipe = write_recipe(work / "r.yaml", RECIPE.format(model=tiny_base, name="r", data=corpus, batch=1))
    result = lorakit("train", recipe, "--nproc", "2", "train.strategy=fsdp", expect=1)
    assert "train.strategy fsdp needs GPUs; on CPUs use strategy: ddp" in result.stderr
