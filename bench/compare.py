"""lorakit's defaults against a plain transformers Trainer + peft script, on the same workload, in one run.

    python bench/compare.py --shape 0.5b                   # about 10 minutes on 2 CPU cores
    python bench/compare.py --shape small --docs 64        # quick
    python bench/compare.py --shape qwen3-0.6b --batch 1   # the Qwen3-0.6B / Llama-3.2-1B shapes: the plain
                                                           # script needs batch 1 to fit 24 GiB

Workloads: CPT on the first --docs documents (64-1024 tokens each), SFT on the first --chats
conversations (answers 20-400 tokens); LoRA r16 on every linear layer; max length 1024; batch 4; one
epoch. Each run is a fresh process. Real tokens are non-padding tokens; tokens/s is real tokens over
the training time (model loading excluded); MFU = 4 x parameters x real tokens / time / the bf16
matmul peak measured at the start of this run. Peak memory is the whole process's peak RSS on a CPU,
torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PEAK_KIND,
    device,
    ensure_model,
    flop_params,
    matmul_peak_gflops,
    peak_memory_gib,
    run_child,
    write_workload,
)

MAX_LENGTH, BATCH, RANK = 1024, 4, 16


def plain(stage: str, model_dir: Path, data: Path, limit: int) -> dict:
    """What a user would write: per-document truncation, padding per batch, default precision."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()][:limit]
    if stage == "cpt":
        texts = [r["text"] + tokenizer.eos_token for r in records]
    else:
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    encoded = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True, remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    seen = {"tokens": 0, "start": 0.0, "end": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            seen["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            seen["end"] = time.perf_counter()

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting(features):
        batch = collator(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, num_train_epochs=1,
                             learning_rate=2e-4, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
                             disable_tqdm=True, logging_steps=1000)
    Trainer(model=model, args=args, train_dataset=encoded, data_collator=counting, callbacks=[Clock()]).train()
    return {"tokens": seen["tokens"], "seconds": seen["end"] - seen["start"], "params": model.num_parameters()}


def lorakit(stage: str, model_dir: Path, data: Path, limit: int) -> dict:
    """lorakit with its defaults: only what the workload fixes is set."""
    from lorakit.recipe import load_recipe
    from lorakit.training.run import run

    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    subset = work / data.name
    subset.write_text("".join(data.read_text().splitlines(keepends=True)[:limit]))
    recipe = work / f"{stage}.yaml"
    recipe.write_text(f"stage: {stage}\nmodel: {model_dir}\ndata: {{path: {subset}, max_length: {MAX_LENGTH}}}\n"
                      f"train: {{epochs: 1, batch_size: {BATCH}, save_steps: 0}}\noutput: {work / 'out'}\n")
    out = run(load_recipe(recipe))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": last["tokens"], "seconds": last["elapsed_s"], "params": None,
            "dtype": manifest["trained_on"]["dtype"]}


def child(runner: str, stage: str, shape: str, limit: int, batch: int) -> None:
    global BATCH
    BATCH = batch
    model_dir = ensure_model(shape)
    cpt, sft = write_workload(Path(tempfile.mkdtemp()))
    result = (plain if runner == "plain" else lorakit)(stage, model_dir, cpt if stage == "cpt" else sft, limit)
    result["peak_gib"] = peak_memory_gib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--stages", default="cpt,sft", help="which workloads, comma-separated")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per batch, for both runs")
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.child:
        runner, stage, shape, limit, batch = args.child
        return child(runner, stage, shape, int(limit), int(batch))
    model_dir = ensure_model(args.shape)
    peak = matmul_peak_gflops()
    params = flop_params(model_dir)
    print(f"bf16 matmul peak {peak:.0f} GFLOP/s; {params / 1e6:.0f}M parameters", file=sys.stderr)
    rows = []
    stages = args.stages.split(",")
    for stage, limit in (("cpt", args.docs), ("sft", args.chats)):
        if stage not in stages:
            continue
        for runner in ("plain", "lorakit"):
            r = run_child(__file__, runner, stage, args.shape, str(limit), str(args.batch))
            r.update(stage=stage, runner=runner, tok_s=r["tokens"] / r["seconds"])
            r["mfu"] = 4 * params * r["tok_s"] / (peak * 1e9)
            rows.append(r)
            print(f"{stage} {runner}: {r}", file=sys.stderr, flush=True)
    print(f"\nOn {device()}; peak memory = {PEAK_KIND[device()]}.")
    print(f"{args.shape if '-' in args.shape else 'Qwen2-' + args.shape} shape, random weights; CPT {args.docs} documents, SFT {args.chats} conversations; "
          f"LoRA r{RANK} all linear; max length {MAX_LENGTH}; batch {args.batch}; bf16 matmul peak {peak:.0f} GFLOP/s\n")
    print("| workload | run | real tokens | real tok/s | MFU vs bf16 peak | peak memory (GiB) |\n|---|---|---|---|---|---|")
    for r in rows:
        name = "plain Trainer+peft script, defaults" if r["runner"] == "plain" else f"lorakit defaults ({r.get('dtype')})"
        print(f"| {r['stage']} | {name} | {r['tokens']} | {r['tok_s']:.1f} | {100 * r['mfu']:.0f}% | "
              f"{r['peak_gib']:.2f} |")
    for stage in stages:
        p, l = [r for r in rows if r["stage"] == stage]
        print(f"\n{stage}: lorakit / plain = {l['tok_s'] / p['tok_s']:.2f}x tokens/s at "
              f"{l['peak_gib'] / p['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
