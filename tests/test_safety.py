"""Never lose a user's files or work: outputs are replaced only when provably lorakit's own, an
interruption or a full disk keeps the training done, and what a killed run left is cleaned up."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import lorakit, write_recipe
from safetensors.torch import load_file

RECIPE = """stage: cpt
model: {model}
data: {{path: {data}, max_length: 32}}
lora: {{r: 4, alpha: 8}}
train: {{max_steps: {steps}, lr: 3.0e-3, batch_size: 2, logging_steps: 1, save_steps: {save}}}
"""


def _recipe(folder, model, data, steps=4, save=200, name="r", extra=""):
    return write_recipe(folder / f"{name}.yaml", RECIPE.format(model=model, data=data, steps=steps, save=save) + extra)


def _error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


# --- 1. Files that are not lorakit's ------------------------------------------------------------------------

def test_a_folder_with_someone_elses_manifest_is_never_replaced(work, corpus, tiny_base, monkeypatch):
    """The issue's reproduction: a web app's manifest.json made lorakit take the folder for its own."""
    project = work / "project"
    (project / "work").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my-app"}')
    (project / "notes.md").write_text("notes")
    recipe = _recipe(project / "work", tiny_base, corpus, extra=f"output: {project}\n")
    monkeypatch.chdir(project / "work")
    line = _error(lorakit("train", recipe, expect=1))
    assert f"{project}: this output folder contains the working folder" in line
    monkeypatch.chdir(work)
    line = _error(lorakit("train", recipe, expect=1))
    assert f"{project}: this output folder contains the recipe" in line
    recipe = _recipe(work, tiny_base, corpus, extra=f"output: {project}\n")
    line = _error(lorakit("train", recipe, expect=1))
    assert "is not a lorakit output (it holds manifest.json, notes.md, work)" in line
    assert (project / "notes.md").read_text() == "notes" and (project / "work" / "r.yaml").is_file()
    assert json.loads((project / "manifest.json").read_text()) == {"name": "my-app"}


@pytest.fixture
def two_adapters(work, corpus, tiny_base):
    for name in ("a", "b"):
        lorakit("train", _recipe(work, tiny_base, corpus, steps=2, name=name))
    return work / "adapters" / "a", work / "adapters" / "b"


@pytest.mark.slow
def test_export_and_merge_never_replace_a_folder_they_did_not_write(work, two_adapters):
    site = work / "site"
    site.mkdir()
    (site / "manifest.json").write_text("{}")
    (site / "index.html").write_text("<html>")
    for command in (["export", two_adapters[0], "-o", site, "--overwrite"],
                    ["merge", "--adapter", two_adapters[0], "--adapter", two_adapters[1], "--weights", "0.5,0.5",
                     "-o", site, "--overwrite"]):
        line = _error(lorakit(*command, expect=1))
        assert "site: exists and is not a lorakit output (it holds index.html, manifest.json)" in line
    assert (site / "index.html").read_text() == "<html>" and (site / "manifest.json").read_text() == "{}"


@pytest.mark.slow
def test_a_finished_adapter_is_replaced_only_with_overwrite_and_only_when_it_holds_nothing_else(work, corpus,
                                                                                                  tiny_base):
    recipe = _recipe(work, tiny_base, corpus)
    lorakit("train", recipe)
    adapter = work / "adapters" / "r"
    first = json.loads((adapter / "manifest.json").read_text())
    line = _error(lorakit("train", recipe, expect=1))
    created = first["created"][:16].replace("T", " ")
    assert (f"adapters/r already holds an adapter (written {created}, final loss "
            f"{first['metrics']['final_loss']:.4f}); pass --overwrite to replace it") in line
    assert json.loads((adapter / "manifest.json").read_text())["run_id"] == first["run_id"]  # untouched
    lorakit("train", recipe, "--overwrite")
    assert json.loads((adapter / "manifest.json").read_text())["run_id"] != first["run_id"]
    (adapter / "my-notes.txt").write_text("mine")
    line = _error(lorakit("train", recipe, "--overwrite", expect=1))
    assert "adapters/r: holds files lorakit did not write (my-notes.txt)" in line
    assert (adapter / "my-notes.txt").read_text() == "mine"


def test_an_output_that_holds_the_data_is_refused(work, tiny_base):
    (work / "data" / "texts").mkdir(parents=True)
    (work / "data" / "texts" / "a.txt").write_text("some text to train on")
    recipe = _recipe(work, tiny_base, "data/texts", extra="output: data\n")
    assert "data: this output folder contains the data (data/texts)" in _error(lorakit("train", recipe, expect=1))
    assert (work / "data" / "texts" / "a.txt").is_file()


@pytest.mark.slow
def test_a_symlinked_output_is_followed_and_stays_a_link(work, corpus, tiny_base):
    (work / "store").mkdir()
    (work / "adapters").mkdir()
    (work / "adapters" / "current").symlink_to(work / "store" / "v1")
    lorakit("train", _recipe(work, tiny_base, corpus, extra="output: adapters/current\n"))
    assert (work / "adapters" / "current").is_symlink()
    assert (work / "store" / "v1" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_tilde_in_the_output_is_the_home_folder(work, corpus, tiny_base, monkeypatch):
    monkeypatch.setenv("HOME", str(work / "home"))
    lorakit("train", _recipe(work, tiny_base, corpus, extra="output: ~/adapters/x\n"))
    assert (work / "home" / "adapters" / "x" / "manifest.json").is_file() and not (work / "~").exists()


# --- 2. Work kept through interruptions --------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_with_the_output_piped_to_a_reader_that_died_still_checkpoints(work, corpus, tiny_base):
    """`lorakit train R 2>&1 | tee log`, then Ctrl-C: tee dies first, and the next progress line used to
    fail with EPIPE inside the Trainer (exit 1, no checkpoint)."""
    recipe = _recipe(work, tiny_base, corpus, steps=5000, save=1000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(recipe)], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = work / "adapters" / ".r.run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    process.stdout.close()  # the reader goes away
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    checkpoints = list((work / "adapters" / ".r.run").glob("checkpoint-*/trainer_state.json"))
    assert len(checkpoints) == 1 and int(checkpoints[0].parent.name.split("-")[1]) < 1000


@pytest.mark.slow
def test_ctrl_c_while_publishing_exits_130_and_resume_writes_the_trained_adapter(work, corpus, tiny_base,
                                                                                 monkeypatch):
    from lorakit.training import run as train

    real = train._check_reload

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_check_reload", interrupted)
    recipe = _recipe(work, tiny_base, corpus, steps=6, save=0)
    result = lorakit("train", recipe, expect=130)
    assert _error(result) == (f"error: interrupted while writing adapters/r: nothing was published; the trained state "
                              f"is kept in adapters/.r.run/checkpoint-6: lorakit train {recipe} --resume writes it "
                              f"without training again")
    assert "Aborted!" not in result.output and not (work / "adapters" / "r").exists()
    assert not list((work / "adapters").glob(".r.partial-*"))
    monkeypatch.setattr(train, "_check_reload", real)
    lorakit("train", recipe, "--resume")
    metrics = [json.loads(line) for line in (work / "adapters" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # nothing trained twice
    assert not (work / "adapters" / ".r.run").exists()


@pytest.mark.slow
def test_ctrl_c_in_any_command_is_one_line_and_exit_130(work, two_adapters, monkeypatch):
    from lorakit.weights import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "merged_model", interrupted)
    result = lorakit("export", two_adapters[0], "-o", work / "out", "--no-verify", expect=130)
    assert _error(result) == "error: interrupted (Ctrl-C)" and "Aborted!" not in result.output


@pytest.mark.slow
def test_a_finished_runs_leftover_checkpoints_never_block_the_next_run(work, corpus, tiny_base, monkeypatch):
    from lorakit.training import run as train

    recipe, real = _recipe(work, tiny_base, corpus), train.remove_folder
    monkeypatch.setattr(train, "remove_folder", lambda folder: None)  # killed between publishing and cleaning up
    lorakit("train", recipe)
    monkeypatch.setattr(train, "remove_folder", real)
    run_folder = work / "adapters" / ".r.run"
    assert (run_folder / "recipe.yaml").is_file() and list(run_folder.glob("checkpoint-*"))
    assert "nothing to resume: adapters/r is complete: an adapter (written" in _error(
        lorakit("train", recipe, "--resume", expect=1))
    assert not run_folder.exists()
    # An older lorakit's cut-short cleanup: checkpoints left, recipe.yaml already gone.
    (run_folder / "checkpoint-4").mkdir(parents=True)
    (run_folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    result = lorakit("train", recipe, "--overwrite")
    assert f"removing {run_folder.relative_to(work)}: the checkpoints of a run that finished" in result.stderr
    assert not run_folder.exists()


@pytest.mark.slow
def test_what_killed_writes_left_is_listed_then_swept(work, corpus, tiny_base):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    adapters = work / "adapters"
    for name in (f".old.partial-{dead.pid}", f".exp.old-{dead.pid}"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "model.safetensors").write_bytes(b"\0" * 4096)
    alive = adapters / f".busy.partial-{os.getppid()}"  # a writer that is still running
    alive.mkdir()
    listing = lorakit("adapters", "list").stdout
    assert f"2 unfinished write(s) of stopped runs (.exp.old-{dead.pid}, .old.partial-{dead.pid}; 8.0 KiB)" in listing
    lorakit("train", _recipe(work, tiny_base, corpus))
    assert sorted(p.name for p in adapters.iterdir() if p.name.startswith(".")) == [alive.name]
    (adapters / f".again.partial-{dead.pid}").mkdir()
    assert lorakit("adapters", "clean").stdout.strip() == f"removed .again.partial-{dead.pid} (0 B)"
    assert alive.is_dir()


def _enospc(path="adapters/.r.partial/adapter_model.safetensors"):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.slow
def test_a_full_disk_at_the_final_write_keeps_the_run_for_resume(work, corpus, tiny_base, monkeypatch):
    from lorakit.training import run as train

    def full(*args, **kwargs):
        raise _enospc()

    real = train.write_adapter
    monkeypatch.setattr(train, "write_adapter", full)
    recipe = _recipe(work, tiny_base, corpus, steps=6, save=0)
    line = _error(lorakit("train", recipe, expect=1))
    assert line == ("error: writing adapters/r failed (No space left on device: adapters/.r.partial/"
                    "adapter_model.safetensors); nothing was published; the trained state is kept in "
                    f"adapters/.r.run/checkpoint-6: lorakit train {recipe} --resume writes it without training again")
    kept = load_file(work / "adapters" / ".r.run" / "checkpoint-6" / "adapter_model.safetensors")
    monkeypatch.setattr(train, "write_adapter", real)
    lorakit("train", recipe, "--resume")
    written = load_file(work / "adapters" / "r" / "adapter_model.safetensors")
    assert kept.keys() == written.keys() and all(torch.equal(kept[k], written[k]) for k in kept)


@pytest.fixture
def stopped_by_a_full_disk(work, corpus, tiny_base, monkeypatch):
    """A run whose checkpoint at step 20 found the disk full: it stops with one line, checkpoint-10 kept."""
    from transformers import Trainer

    real = Trainer._save_rng_state

    def full_at_20(self, output_dir):
        if self.state.global_step == 20:
            raise _enospc(f"{output_dir}/rng_state.pth")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_at_20)
    recipe = _recipe(work, tiny_base, corpus, steps=40, save=10)
    line = _error(lorakit("train", recipe, expect=1))
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    return recipe, line


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_stops_with_one_line_and_keeps_the_last_checkpoint(work,
                                                                                         stopped_by_a_full_disk):
    _, line = stopped_by_a_full_disk
    assert line.startswith("error: writing a checkpoint failed at step 20 (No space left on device: ")
    assert line.endswith("training stopped. The last complete checkpoint is adapters/.r.run/checkpoint-10: make "
                         "room and continue with --resume")
    assert sorted(p.name for p in (work / "adapters" / ".r.run").glob("checkpoint-*")) == ["checkpoint-10"]


@pytest.mark.slow
def test_resume_refuses_data_that_changed_since_the_interruption(work, corpus, stopped_by_a_full_disk):
    recipe, _ = stopped_by_a_full_disk
    (corpus / "new.txt").write_text("A document that was not there when the run started, and changes the rows.")
    line = _error(lorakit("train", recipe, "--resume", expect=1))
    assert "the data changed since the interrupted run (hash " in line and "resume with the same data" in line
    (corpus / "new.txt").unlink()
    lorakit("train", recipe, "--resume")  # the same data again: resumes
    assert (work / "adapters" / "r" / "manifest.json").is_file()


# --- 6. A busy machine -------------------------------------------------------------------------------------

def test_the_cli_makes_openmp_threads_yield_before_torch_is_loaded(work):
    code = ("import os, sys\nfrom lorakit.cli import main\nassert 'torch' not in sys.modules\n"
            "try:\n    main(['adapters', 'list'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "LORAKIT_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, check=False)
    # idle: short spinning; busy (another job on the machine, as on a shared CI runner): passive waiting
    assert out.stdout.strip().splitlines()[-1] in ("10000 None", "None PASSIVE"), out.stderr
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=False)
    assert out.stdout.strip().splitlines()[-1] == "None ACTIVE", out.stderr  # a user's own OpenMP setting is kept
