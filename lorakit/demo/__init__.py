"""`lorakit demo`: the whole product offline in a few minutes on a CPU.

Builds a tiny random Qwen2 with a tokenizer trained on the bundled data, asks it the demo questions,
runs the CPT recipe then the SFT recipe on top of it, and asks again.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LorakitError

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
QUESTIONS = ["How much water does the Lumora K2 hold?", "How do I reach support?", "怎么给水壶除垢？"]
CONTINUE = "The Lumora K2 is"


def demo_texts(folder: Path = RECIPES) -> list[str]:
    """Everything the tiny tokenizer is trained on: the corpus and the rendered conversations."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((folder / "corpus").glob("*.txt"))]
    for line in (folder / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            texts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    texts.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    return texts


def run_demo(workdir: str, echo) -> None:
    from ..recipe import load_recipe
    from ..training.run import RunOptions, run
    from ..weights.loading import resolve_device
    from .tiny import build_tiny_qwen2

    if not RECIPES.is_dir():
        raise LorakitError(f"{RECIPES}: demo recipes not found; run the demo from a lorakit checkout")
    # The recipes hold paths relative to the repository; the demo pins them so it runs from anywhere.
    model_dir = Path(workdir) / "tiny-qwen2"
    cpt = load_recipe(RECIPES / "cpt.yaml", [f"model={model_dir}", f"data.path={RECIPES / 'corpus'}"])
    sft = load_recipe(RECIPES / "sft.yaml", [f"parent={cpt.output_dir}", f"data.path={RECIPES / 'chat.jsonl'}"])
    echo(f"building a tiny random Qwen2 in {model_dir} (no download)")
    build_tiny_qwen2(model_dir, demo_texts(), instruct=False, hidden=128, layers=2)
    device = resolve_device()
    before = [_continuation(str(model_dir), None, device)] + _chat_answers(str(model_dir), None, device)
    echo("stage 1: continued pre-training on the product texts")
    again = RunOptions(overwrite=True)  # the demo's own adapters, replaced on every run of the demo
    cpt_adapter = run(cpt, again)
    echo("stage 2: chat SFT on top of the CPT adapter")
    adapter = run(sft, again)
    after = [_continuation(None, str(cpt_adapter), device)] + _chat_answers(None, str(adapter), device)
    for question, old, new in zip([f"(continue) {CONTINUE} ..."] + QUESTIONS, before, after):
        echo(f"\nQ: {question}\n  before: {old!r}\n  after:  {new!r}")
    echo(f"\nadapters: {cpt.output_dir} (CPT), {adapter} (SFT on top of it); try:\n"
         f"  lorakit chat --adapter {adapter} --greedy --prompt \"{QUESTIONS[0]}\"")


def _load(model: str | None, adapter: str | None, device: str):
    from ..weights.folders import load_for_inference
    from ..weights.loading import resolve_dtype

    return load_for_inference(model, adapter, device, resolve_dtype("auto", device))


def _continuation(model: str | None, adapter: str | None, device: str) -> str:
    """Greedy continuation of the demo's text prompt (what CPT teaches)."""
    from ..inference.generate import Sampling, generate_text

    lm, tokenizer, _ = _load(model, adapter, device)
    return generate_text(lm, tokenizer, CONTINUE, Sampling(greedy=True, max_new_tokens=40))


def _chat_answers(model: str | None, adapter: str | None, device: str) -> list[str]:
    """Greedy chat answers to the demo questions (what SFT teaches), with the recorded system prompt."""
    from ..data.template import template_system_prompt
    from ..inference.generate import Sampling, chat_reply

    lm, tokenizer, manifest = _load(model, adapter, device)
    system = manifest.system_prompt if manifest else template_system_prompt(tokenizer)
    greedy = Sampling(greedy=True, max_new_tokens=40)
    return [chat_reply(lm, tokenizer, [{"role": "user", "content": q}], system, greedy) for q in QUESTIONS]
