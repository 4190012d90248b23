"""DPO: lorakit (packed and unpacked) against trl's DPOTrainer with its defaults, on the same pairs, in one run.

    python bench/dpo.py --shape 0.5b --pairs 16     # about 15 minutes on 2 CPU cores
    python bench/dpo.py --shape small --pairs 32    # quick

Pairs: a question of 5-20 words, a chosen and a rejected answer of 15-300 words each (about 20-400 tokens). LoRA
r16 on every linear layer, batch 4 (rows for lorakit; pairs for trl), max length 1024, one epoch, reference = the
adapter switched off (no second model) in both. Real tokens are non-padding tokens of prompt + answer, both
answers counted; tokens/s is real tokens over the training time (model loading and tokenization excluded).
Each run is a fresh process; peak memory is its peak RSS on a CPU, torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from common import PEAK_KIND, WORDS, device, ensure_model, peak_memory_gib, run_child

MAX_LENGTH, BATCH, RANK = 1024, 4, 16


def pairs(count: int, words: tuple[int, int], seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    say = lambda low, high: " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))  # noqa: E731
    return [{"prompt": say(5, 20) + "?", "chosen": say(*words) + ".", "rejected": say(*words) + "."}
            for _ in range(count)]


def trl_run(model_dir: Path, data: list[dict]) -> dict:
    """trl's DPOTrainer as its documentation sets it up: a peft config, no ref_model, DPOConfig's defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    seen = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            seen["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            seen["end"] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversational = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                       "chosen": [{"role": "assistant", "content": p["chosen"]}],
                       "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in data]
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, num_train_epochs=1,
                     max_length=MAX_LENGTH, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1000,
                     use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(conversational), processing_class=tokenizer,
                         peft_config=LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    trainer.train()
    settings = f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}"
    return {"tokens": trainer._total_train_tokens, "seconds": seen["end"] - seen["start"], "settings": settings}


def lorakit_run(model_dir: Path, data: list[dict], packing: bool) -> dict:
    from lorakit.recipe import load_recipe
    from lorakit.training.run import run

    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in data))
    recipe = work / "dpo.yaml"
    recipe.write_text(f"stage: dpo\nmodel: {model_dir}\ndata: {{path: {path}, max_length: {MAX_LENGTH}, "
                      f"packing: {str(packing).lower()}}}\ntrain: {{epochs: 1, batch_size: {BATCH}, save_steps: 0}}\n"
                      f"output: {work / 'out'}\n")
    out = run(load_recipe(recipe))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    dtype = json.loads((out / "manifest.json").read_text())["trained_on"]["dtype"]
    return {"tokens": last["tokens"], "seconds": last["elapsed_s"], "settings": f"{dtype}, packing={packing}"}


def child(runner: str, shape: str, count: int, short: bool) -> None:
    model_dir, data = ensure_model(shape), pairs(count, (3, 40) if short else (15, 300))
    result = trl_run(model_dir, data) if runner == "trl" else lorakit_run(model_dir, data, runner == "packed")
    result["peak_gib"] = peak_memory_gib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--runners", default="trl,unpacked,packed")
    parser.add_argument("--short", action="store_true", help="answers of 3-40 words instead of 15-300")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args.child[3] == "short")
    ensure_model(args.shape)
    rows = []
    for runner in args.runners.split(","):
        r = run_child(__file__, runner, args.shape, str(args.pairs), "short" if args.short else "long")
        r.update(runner=runner, tok_s=r["tokens"] / r["seconds"])
        rows.append(r)
        print(f"{runner}: {r}", file=sys.stderr, flush=True)
    print(f"\nOn {device()}; peak memory = {PEAK_KIND[device()]}.")
    print(f"{'Qwen2-' + args.shape if '-' not in args.shape else args.shape} shape, random weights; {args.pairs} pairs; "
          f"LoRA r{RANK} all linear; max length {MAX_LENGTH}; batch {BATCH}; one epoch\n")
    print("| run | settings | real tokens | seconds | real tok/s | peak memory (GiB) |\n|---|---|---|---|---|---|")
    names = {"trl": "trl DPOTrainer, defaults", "unpacked": "lorakit dpo, data.packing: false",
             "packed": "lorakit dpo, defaults (packed)"}
    for r in rows:
        print(f"| {names[r['runner']]} | {r['settings']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
              f"{r['peak_gib']:.2f} |")
    base = rows[0]
    for r in rows[1:] if base["runner"] == "trl" else []:
        print(f"\n{names[r['runner']]} / trl: {r['tok_s'] / base['tok_s']:.2f}x tokens/s at "
              f"{r['peak_gib'] / base['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
