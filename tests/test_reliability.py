"""Reliability: resume exactly after a kill, stop cleanly on signals and NaN, one run per output."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import lorakit, write_recipe
from safetensors.torch import load_file

import lorakit.training.run as run_module

pytestmark = pytest.mark.slow  # every test here trains a model

RECIPE = """stage: cpt
model: {model}
output: adapters/{name}
data: {{path: {data}, max_length: 32}}
lora: {{r: 8, alpha: 16, dropout: 0.1}}
train: {{max_steps: {steps}, lr: {lr}, batch_size: 2, warmup_ratio: 0.1, logging_steps: 1, save_steps: 10,
         keep_checkpoints: 2, seed: 7}}
"""


def _recipe(work, name, model, corpus, steps=120, lr="3.0e-3"):
    return write_recipe(work / f"{name}.yaml", RECIPE.format(model=model, name=name, data=corpus, steps=steps, lr=lr))


def _spawn(work, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", *map(str, args)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def _metrics(adapter):
    return {m["step"]: m["loss"] for m in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def test_a_run_killed_at_any_point_resumes_to_the_same_adapter(work, corpus, tiny_base):
    reference = _spawn(work, "train", _recipe(work, "whole", tiny_base, corpus))
    assert reference.wait() == 0, reference.communicate()
    recipe = _recipe(work, "killed", tiny_base, corpus)
    victim = _spawn(work, "train", recipe)
    _wait_for(work / "adapters" / ".killed.run" / "checkpoint-30" / "trainer_state.json", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (work / "adapters" / "killed").exists()
    resumed = _spawn(work, "train", recipe, "--resume")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    whole, killed = work / "adapters" / "whole", work / "adapters" / "killed"
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    curve, resumed_curve = _metrics(whole), _metrics(killed)
    assert sorted(resumed_curve) == list(range(1, 121))  # one line per step, no duplicates after resume
    assert all(abs(curve[s] - resumed_curve[s]) < 1e-4 for s in range(31, 121))
    assert not (work / "adapters" / ".killed.run").exists()  # checkpoints go once the adapter is published


def test_ctrl_c_writes_a_checkpoint_says_how_to_resume_and_exits_non_zero(work, corpus, tiny_base):
    recipe = _recipe(work, "stopped", tiny_base, corpus, steps=5000)
    process = _spawn(work, "train", recipe)
    _wait_for(work / "adapters" / ".stopped.run" / "checkpoint-10" / "trainer_state.json", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: SIGINT at step") and "--resume" in line
    step = int(line.split("at step ")[1].split(":")[0])
    assert (work / "adapters" / ".stopped.run" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert not (work / "adapters" / "stopped").exists()
    result = lorakit("train", recipe, expect=1)  # a fresh start would throw that work away: refused
    assert "continue it with --resume" in result.stderr
    result = lorakit("train", recipe, "--resume", "train.lr=1e-3", expect=1)
    assert "the recipe changed since the interrupted run (train.lr" in result.stderr


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(work, corpus, tiny_base,
                                                                                      monkeypatch):
    from lorakit.weights.loading import make_trainable as real

    calls = {"n": 0}

    def blows_up_at_step_15(model, recipe, quantized, *rest):  # a numeric blow-up, as bad data or a bad lr make one
        model = real(model, recipe, quantized, *rest)

        def hook(module, args, output):
            calls["n"] += 1
            if calls["n"] >= 15:
                output.logits = output.logits * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(run_module, "make_trainable", blows_up_at_step_15)
    result = lorakit("train", _recipe(work, "nan", tiny_base, corpus), expect=1)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the loss became nan at step 15: training stopped"), line
    assert "last good checkpoint is adapters/.nan.run/checkpoint-10" in line
    assert not (work / "adapters" / "nan").exists()
    kept = load_file(work / "adapters" / ".nan.run" / "checkpoint-10" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_two_runs_cannot_write_the_same_output(work, corpus, tiny_base):
    from pathlib import Path

    from lorakit.training.checkpoints import output_lock

    with output_lock(Path("adapters/locked")):
        result = lorakit("train", _recipe(work, "locked", tiny_base, corpus, steps=2), expect=1)
    assert f"being written by another lorakit run (pid {os.getpid()})" in result.stderr
    lorakit("train", _recipe(work, "locked", tiny_base, corpus, steps=2))  # free again once the first ends


def test_a_full_disk_fails_before_training_with_the_figure(work, corpus, tiny_base, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    result = lorakit("train", _recipe(work, "full-disk", tiny_base, corpus, steps=2), expect=1)
    # a small run's figures in units that show them (not "needs about 0.00 GiB ... only 0.00 GiB is free")
    assert re.search(r"needs about [1-9][\d.]* (KiB|MiB) in adapters, but only 1000 B is free", result.stderr)
    assert not (work / "adapters" / "full-disk").exists()


def test_an_export_that_will_not_fit_fails_before_writing(work, corpus, tiny_base, monkeypatch):
    import shutil
    from collections import namedtuple

    lorakit("train", _recipe(work, "small", tiny_base, corpus, steps=3))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    result = lorakit("export", "adapters/small", "-o", "exports/small", expect=1)
    assert "the bf16 export needs about" in result.stderr and not (work / "exports" / "small").exists()
