"""What a new user met deploying, and what an adversary broke: no command writes over its own inputs,
what lorakit writes loads from anywhere, files point where their readers look, and a damaged or foreign
manifest, a looping chain or a mistyped key is one line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DOCS, lorakit, write_jsonl, write_recipe

from lorakit.recipe import load_recipe


def _error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


# --- recipes: what people type ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, expected", [
    ("train.learning_rate", "lorakit calls it train.lr"), ("train.num_train_epochs", "lorakit calls it train.epochs"),
    ("train.per_device_train_batch_size", "lorakit calls it train.batch_size"),
    ("train.gradient_accumulation_steps", "lorakit calls it train.grad_accum"),
    ("lora.lora_r", "lorakit calls it lora.r"), ("lora_alpha", "lorakit calls it lora.alpha"),
    ("data.max_seq_length", "lorakit calls it data.max_length"), ("model_name_or_path", "lorakit calls it model"),
])
def test_the_names_other_trainers_use_point_at_lorakits_key(work, key, expected):
    recipe = write_recipe(work / "r.yaml", "stage: cpt\nmodel: m\ndata: {path: x}\n")
    line = _error(lorakit("validate", recipe, f"{key}=1", expect=1))
    assert expected in line and f"command line {key}=1" in line
    section, _, leaf = key.rpartition(".")
    raw = {"stage": "cpt", "model": "m", "data": {"path": "x"}}
    (raw.setdefault(section, {}) if section else raw)[leaf] = 1
    line = _error(lorakit("validate", write_recipe(work / "r2.yaml", json.dumps(raw)), expect=1))
    assert line.startswith(f"error: {work / 'r2.yaml'}: unknown key") and expected in line


def test_an_overrides_mistake_names_the_command_line_not_the_recipe(work):
    recipe = write_recipe(work / "r.yaml", "stage: cpt\nmodel: m\ndata: {path: x}\ntrain: {lr: 1.0e-4}\n")
    assert _error(lorakit("validate", recipe, "train.lr=abc", expect=1)) == \
        "error: command line train.lr=abc: train.lr must be a number, got 'abc'"
    assert _error(lorakit("validate", recipe, "train.lr=-1", expect=1)) == \
        "error: command line train.lr=-1: train.lr must be positive, got -1.0"
    assert "command line data.max_length=[" in _error(lorakit("validate", recipe, "data.max_length=[", expect=1))
    bad = write_recipe(work / "bad.yaml", "stage: cpt\nmodel: m\ndata: {path: x}\ntrain: {lr: abc}\n")
    assert _error(lorakit("validate", bad, "train.epochs=2", expect=1)).startswith(f"error: {bad}: train.lr")


def test_train_checks_the_recipe_before_loading_the_stack(work):
    """A mistyped key is answered before torch, peft and datasets are imported (a second, not ten)."""
    recipe = write_recipe(work / "r.yaml", "stage: cpt\nmodel: m\ndata: {path: x}\ntrain: {learning_rate: 1}\n")
    probe = ("import sys; from lorakit.cli import main\n"
             "try:\n    main(['train', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
             "print(*[name in sys.modules for name in ('torch', 'peft', 'datasets')])")
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True)
    assert "lorakit calls it train.lr" in done.stderr and done.stdout.split() == ["False", "False", "False"]


def test_a_loss_line_of_one_logged_step_is_not_a_trend():
    from lorakit.training.progress import loss_line

    one = loss_line({"first_loss": 7.3009, "final_loss": 7.3009, "steps": 1, "tokens_per_s": 10}, 1, 2, 5)
    assert "->" not in one and "the only logged step" in one and "train.logging_steps is 5" in one
    two = loss_line({"first_loss": 7.3, "final_loss": 2.1, "steps": 4, "tokens_per_s": 10}, 4, 4, 1)
    assert two.startswith("loss 7.3000 -> 2.1000 in 4 steps")


def test_export_refuses_a_shard_size_of_nothing(work):
    line = _error(lorakit("export", work, "--shard-size", "0", "-o", work / "out", expect=2))
    assert "--shard-size" in line and "must hold something" in line


# --- writing over inputs, and files that load from anywhere --------------------------------------------------

@pytest.fixture(scope="module")
def on_a_full_model(tmp_path_factory, tiny_base):
    """A full fine-tune (a lorakit model folder) and a LoRA adapter trained on it, the issue's set-up."""
    folder = tmp_path_factory.mktemp("lastmile")
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in DOCS])
    train = "train: {max_steps: 2, lr: 1.0e-3, batch_size: 4, logging_steps: 5}\n"
    lorakit("train", write_recipe(folder / "full.yaml", f"stage: cpt\nmodel: {tiny_base}\nmethod: full\noutput: "
                                                        f"{folder / 'full'}\ndata: {{path: {folder / 'docs.jsonl'}}}\n{train}"))
    write_jsonl(folder / "one.jsonl", [{"text": DOCS[0]}])
    lora = lorakit("train", write_recipe(folder / "lora.yaml", f"stage: cpt\nmodel: {folder / 'full'}\noutput: "
                                                               f"{folder / 'lora'}\ndata: {{path: {folder / 'one.jsonl'}}}\n"
                                                               f"{train}"))
    return folder, lora.stderr


@pytest.mark.slow
def test_no_command_writes_over_the_base_its_adapter_was_trained_on(work, on_a_full_model):
    folder, _ = on_a_full_model
    base, lora = folder / "full", folder / "lora"
    before = sorted(p.name for p in base.iterdir())
    for command in (["export", lora, "-o", base, "--overwrite"],
                    ["export", lora, "--format", "gguf", "-o", base, "--overwrite"],
                    ["export", lora, "--format", "adapter", "-o", base, "--overwrite"],
                    ["merge", "--adapter", lora, "-o", base, "--overwrite"]):
        line = _error(lorakit(*command, expect=1))
        assert f"{base}: this output folder contains the base model of {lora}" in line
    assert sorted(p.name for p in base.iterdir()) == before


@pytest.mark.slow
def test_the_training_log_says_what_a_tiny_run_cannot_show(on_a_full_model):
    _, log = on_a_full_model
    assert "fewer than one batch (4 = train.batch_size x train.grad_accum)" in log
    assert "->" not in [line for line in log.splitlines() if line.startswith(("loss", "2 steps"))][-1]


@pytest.mark.slow
def test_an_exported_adapter_loads_with_auto_peft_from_any_folder(work, on_a_full_model, tmp_path_factory):
    folder, _ = on_a_full_model
    lorakit("export", folder / "lora", "--format", "adapter", "-o", work / "flat")
    config = json.loads((work / "flat" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((folder / "full").resolve())
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    probe = ("import sys; from peft import AutoPeftModelForCausalLM; "
             "AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); print('loaded')")
    done = subprocess.run([sys.executable, "-c", probe, str(work / "flat")], capture_output=True, text=True,
                          cwd=elsewhere, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip() == "loaded", done.stderr[-2000:]


@pytest.mark.slow
def test_gguf_files_name_the_output_and_the_modelfile_finds_its_base(work, on_a_full_model):
    import gguf

    from lorakit.weights.gguf import parse_modelfile

    folder, _ = on_a_full_model
    result = lorakit("export", folder / "full", "--format", "gguf", "--quant", "f32", "-o", work / "gguf" / "base")
    assert ".merging-" not in result.stderr and "safetensors shard" not in result.stderr
    reader = gguf.GGUFReader(str(work / "gguf" / "base" / "model.gguf"))
    assert reader.fields["general.name"].contents() == "base"
    lorakit("export", folder / "lora", "--format", "gguf-adapter", "--base-gguf", "gguf/base/model.gguf",
            "-o", work / "gguf" / "adapter")
    modelfile = work / "gguf" / "adapter" / "Modelfile"
    source = parse_modelfile(modelfile.read_text())["FROM"][0]
    assert source == "../base/model.gguf" and (modelfile.parent / source).resolve() == \
        (work / "gguf" / "base" / "model.gguf").resolve()


# --- manifests and chains that cannot be trusted --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ({"quantization": "abc"}, "`quantization` must be an object"),
    ({"quantization": {"bits": 3, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}}, "`quantization`"),
    ({"schema": 99}, "written by a newer lorakit (manifest schema 99"),
])
def test_a_manifest_lorakit_cannot_read_is_one_line(work, on_a_full_model, damage, message):
    import shutil

    folder, _ = on_a_full_model
    copy = work / "copy"
    shutil.copytree(folder / "lora", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **damage}))
    for command in (["chat", "--adapter", copy, "--prompt", "hi"], ["export", copy, "-o", work / "out"]):
        line = _error(lorakit(*command, expect=1))
        assert str(copy / "manifest.json") in line and message in line


@pytest.mark.slow
def test_a_parent_chain_that_loops_is_one_line(work, on_a_full_model):
    import shutil

    folder, _ = on_a_full_model
    for name in ("a", "b"):
        shutil.copytree(folder / "lora", work / name)
    (work / "a" / "parent").symlink_to(work / "b")
    (work / "b" / "parent").symlink_to(work / "a")
    self_loop = work / "self"
    shutil.copytree(folder / "lora", self_loop)
    (self_loop / "parent").symlink_to(self_loop)
    for adapter in (work / "a", self_loop):
        line = _error(lorakit("generate", "--adapter", adapter, "hello", expect=1))
        assert "the chain of parents loops back on itself" in line


def test_a_chat_session_ends_at_quit_and_names_its_adapter(tiny_instruct):
    from click.testing import CliRunner

    from lorakit.cli import main

    result = CliRunner().invoke(main, ["chat", "--model", str(tiny_instruct), "--greedy", "--max-new-tokens", "4"],
                                input="/help\n/quit\nnever sent\n")
    assert result.exit_code == 0, result.output
    assert "chat with the base model" in result.output and "/quit" in result.output
    assert "unknown command /help" in result.output and "assistant>" not in result.output


def test_recipe_keys_still_load(work):
    """The aliases only point: a recipe with lorakit's own keys loads as before."""
    recipe = load_recipe(write_recipe(work / "r.yaml", "stage: cpt\nmodel: m\ndata: {path: x}\ntrain: {lr: 1.0e-4}\n"))
    assert recipe.train.lr == 1e-4


def test_a_failed_vllm_start_is_reported_by_its_root_cause_not_its_last_line():
    from lorakit.inference.vllm_process import root_cause

    log = "\n".join([
        "(APIServer pid=7) INFO 12-03 10:02:09 [api_server.py:1] vLLM API server version 0.32.0",
        "(VllmWorker-0 pid=9) ERROR 12-03 10:02:34 [multiproc_executor.py:953] WorkerProc failed to start.",
        "(VllmWorker-0 pid=9) ERROR 12-03 10:02:34 [multiproc_executor.py:953] Traceback (most recent call last):",
        "(VllmWorker-0 pid=9) ERROR 12-03 10:02:34 [multiproc_executor.py:953] ValueError: Available memory on node 0 "
        "(7.37/8.96 GiB) on startup is less than desired CPU memory utilization (0.99, 8.87 GiB).",
        "(EngineCore pid=8) ERROR 12-03 10:02:36 [core.py:1510] EngineCore failed to start.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
    ])
    assert root_cause(log) == ("ValueError: Available memory on node 0 (7.37/8.96 GiB) on startup is less than "
                               "desired CPU memory utilization (0.99, 8.87 GiB).")
    assert root_cause("starting\nKilled") == "starting | Killed"


def _full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("form, where", [("gguf", "lorakit.weights.gguf.write_model"),
                                         ("adapter", "lorakit.weights.flatten.record_base"),
                                         ("model", "lorakit.weights.export.set_stop_tokens")])
def test_a_full_disk_while_exporting_is_one_line_and_leaves_nothing(work, on_a_full_model, monkeypatch, form, where):
    folder, _ = on_a_full_model
    monkeypatch.setattr(where, _full_disk)
    line = _error(lorakit("export", folder / "lora", "--format", form, "-o", work / "out", expect=1))
    assert line.startswith(f"error: writing {work / 'out'} failed (No space left on device); nothing was kept")
    assert sorted(p.name for p in work.iterdir()) == []


def test_a_full_disk_while_preparing_data_is_one_line(work, tiny_base, monkeypatch):
    from lorakit.data import prepare as preparing

    write_jsonl(work / "docs.jsonl", [{"text": d} for d in DOCS])
    monkeypatch.setattr(preparing, "_write_rows", _full_disk)
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: docs.jsonl, cache_dir: "
                                           f"{work / 'cache'}}}\n")
    line = _error(lorakit("data", "prepare", recipe, expect=1))
    assert line.startswith(f"error: preparing the data in {work / 'cache'}: No space left on device; nothing was kept")
    assert [p for p in (work / "cache").iterdir() if not p.name.endswith(".lock")] == []
