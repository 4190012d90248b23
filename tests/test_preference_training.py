"""A preference stage on top of CPT -> SFT: it learns (reward accuracy from chance or below to at least 0.9, greedy
answers moving from the rejected to the chosen ones), and its adapter goes everywhere any adapter goes."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import DOCS, load_metrics, lorakit, write_jsonl, write_recipe
from preference_data import PAIRS, string_pairs
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains a model

RECIPE = """stage: {stage}
{model}
output: {output}
data: {{path: {data}, max_length: 64{extra_data}}}
lora: {{r: 16, alpha: 32}}
pref: {{sft_weight: {sft_weight}}}
train: {{max_steps: {steps}, lr: {lr}, batch_size: 2, warmup_ratio: 0.0, logging_steps: 1, save_steps: {save}, seed: 5}}
"""


def recipe(folder, name, stage, data, steps, lr="3.0e-3", model=None, parent=None, sft_weight=0.0, extra_data="",
           save=0):
    where = f"model: {model}" if model else f"parent: {parent}"
    return write_recipe(folder / f"{name}.yaml", RECIPE.format(
        stage=stage, model=where, output=folder / name, data=data, steps=steps, lr=lr, sft_weight=sft_weight,
        extra_data=extra_data, save=save))


def ask(adapter, question: str) -> str:
    return lorakit("chat", "--adapter", adapter, "--greedy", "--max-new-tokens", "24", "--prompt", question).stdout.strip()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_instruct):
    """CPT on the documents -> SFT on the rejected answers -> DPO (with the chosen answers' NLL) on the pairs."""
    folder = tmp_path_factory.mktemp("preference")
    docs = write_jsonl(folder / "docs.jsonl", [{"text": d} for d in DOCS])
    lorakit("train", recipe(folder, "cpt", "cpt", docs, 20, model=tiny_instruct))
    rejected = write_jsonl(folder / "rejected.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, _, r in PAIRS])
    lorakit("train", recipe(folder, "sft", "sft", rejected, 100, parent=folder / "cpt"))
    pairs = write_jsonl(folder / "pairs.jsonl", string_pairs())
    held_out = write_jsonl(folder / "held.jsonl", [{"prompt": "Say hello", "chosen": "Hello there!", "rejected": "No."}])
    lorakit("train", recipe(folder, "dpo", "dpo", pairs, 60, parent=folder / "sft", sft_weight=1.0,
                            extra_data=f", eval_path: {held_out}"))
    return folder


def test_dpo_on_top_of_sft_moves_the_greedy_answers_from_rejected_to_chosen(chain):
    for question, chosen, rejected in PAIRS:
        assert ask(chain / "sft", question) == rejected
        assert ask(chain / "dpo", question) == chosen


def test_the_metrics_show_the_chosen_answers_winning(chain):
    history = [m for m in load_metrics(chain / "dpo") if "loss" in m]
    assert history[0]["rewards/accuracies"] <= 0.6 and history[-1]["rewards/accuracies"] >= 0.9
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 1
    assert history[-1]["rewards/chosen"] > history[-1]["rewards/rejected"]
    evals = [m for m in load_metrics(chain / "dpo") if "eval_loss" in m]
    assert evals and {"eval_rewards/accuracies", "eval_rewards/margins"} <= evals[-1].keys()
    manifest = json.loads((chain / "dpo" / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["parent"]["stage"] == "sft"
    assert manifest["metrics"]["rewards/accuracies"] >= 0.9 and "eval_rewards/accuracies" in manifest["metrics"]
    from PIL import Image

    assert Image.open(chain / "dpo" / "loss.png").size[0] > 1000  # the loss beside the rewards panel


@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])
def test_every_preference_stage_learns_to_prefer_the_chosen_answers(chain, stage):
    data = chain / "pairs.jsonl"
    if stage == "kto":
        data = write_jsonl(chain / "kto.jsonl", [{"prompt": q, "completion": answer, "label": label}
                                                 for q, c, r in PAIRS for answer, label in ((c, True), (r, False))])
    lorakit("train", recipe(chain, stage, stage, data, 40, parent=chain / "sft"))
    history = [m for m in load_metrics(chain / stage) if "loss" in m]
    assert history[0]["rewards/accuracies"] <= 0.6 and history[-1]["rewards/accuracies"] >= 0.9, history
    assert history[-1]["loss"] < history[0]["loss"]


def test_a_preference_adapter_merges_and_exports_like_any_other(chain, work):
    """Every export checks its own logits against the adapter on its base; the merged model answers as taught."""
    question = PAIRS[0][0]
    lorakit("merge", "--adapter", chain / "dpo", "--dtype", "fp32", "-o", work / "merged")
    assert lorakit("chat", "--model", work / "merged", "--greedy", "--max-new-tokens", "24", "--prompt",
                   question).stdout.strip() == PAIRS[0][1]
    for form in ("model", "adapter", "gguf", "gguf-adapter"):
        lorakit("export", chain / "dpo", "--format", form, "-o", work / form)
    assert "<|im_start|>" in (work / "gguf" / "Modelfile").read_text()  # chat-tuned: the chat template goes along


def test_eval_and_compare_take_a_preference_adapter(chain, work):
    chosen = write_jsonl(work / "chosen.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]} for q, c, _ in PAIRS])
    table = lorakit("eval", "--adapter", f"sft={chain / 'sft'}", "--adapter", f"dpo={chain / 'dpo'}", "--data",
                    chosen).stdout
    perplexity = {line.split()[0]: float(line.split()[2]) for line in table.splitlines()
                  if line.split()[:1] in (["sft"], ["dpo"])}
    assert perplexity["dpo"] < perplexity["sft"] / 2  # the chosen answers became the likely ones
    (work / "prompts.txt").write_text(PAIRS[0][0] + "\n")
    lorakit("compare", "--adapter", f"dpo={chain / 'dpo'}", "--prompts", work / "prompts.txt", "-o", work / "report.md")
    assert PAIRS[0][1] in (work / "report.md").read_text()  # answered in chat mode, as trained


def test_a_killed_dpo_run_resumes_to_the_same_adapter(chain, work):
    from test_reliability import _spawn, _wait_for

    pairs = chain / "pairs.jsonl"
    whole = recipe(work, "whole", "dpo", pairs, 30, parent=chain / "sft", save=10)
    assert _spawn(work, "train", whole).wait() == 0
    killed = recipe(work, "killed", "dpo", pairs, 30, parent=chain / "sft", save=10)
    victim = _spawn(work, "train", killed)
    _wait_for(work / ".killed.run" / "checkpoint-10" / "trainer_state.json", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _spawn(work, "train", killed, "--resume")
    assert resumed.wait() == 0, resumed.communicate()
    a, b = load_file(work / "whole" / "adapter_model.safetensors"), load_file(work / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_two_processes_train_dpo_like_one(chain, work):
    from test_distributed import _run

    pairs = chain / "pairs.jsonl"
    for name, batch in (("two", 1), ("one", 2)):
        text = recipe(work, name, "dpo", pairs, 8, parent=chain / "sft").read_text()
        write_recipe(work / f"{name}.yaml", text.replace("batch_size: 2", f"batch_size: {batch}")
                     .replace("seed: 5}", "seed: 5, dtype: fp32}").replace("max_length: 64", "max_length: 64, packing: false"))
    result = _run(work, "train", work / "two.yaml", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert "all 2 processes hold the same trained weights" in result.stderr
    assert _run(work, "train", work / "one.yaml").returncode == 0
    ddp, single = ([m for m in load_metrics(work / n) if "loss" in m] for n in ("two", "one"))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, single)) < 0.05, (ddp, single)
    a, b = load_file(work / "two" / "adapter_model.safetensors"), load_file(work / "one" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=2e-3) for k in a)


def test_precomputed_reference_trains_as_the_live_one_and_is_kept_for_the_next_run(chain, work):
    pairs = chain / "pairs.jsonl"
    curves = {}
    for name, mode in (("live", "live"), ("first", "precomputed"), ("again", "precomputed")):
        text = recipe(work, name, "dpo", pairs, 10, parent=chain / "sft").read_text()
        said = lorakit("train", write_recipe(work / f"{name}.yaml", text), f"pref.reference={mode}").stderr
        curves[name] = [m["loss"] for m in load_metrics(work / name) if "loss" in m]
        if name == "again":
            assert "reference log-probabilities read from" in said
    assert len(curves["live"]) == 10
    for name in ("first", "again"):
        assert max(abs(a - b) for a, b in zip(curves["live"], curves[name])) < 2e-3, curves
