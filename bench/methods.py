"""LoRA vs QLoRA-4bit vs QLoRA-8bit vs full fine-tuning: tokens/s and peak memory, each method in a
fresh process so its peak is its own.

    python bench/methods.py --shape 0.5b --seq 512 --steps 6        # about 10 minutes on 2 CPU cores

Prints a Markdown table for bench/RESULTS.md. Tokens/s counts real tokens between the first and the
last logged step (the first step's warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from common import (
    PEAK_KIND,
    ROOT,
    cpt_recipe,
    device,
    ensure_model,
    flop_params,
    logged_speed,
    matmul_peak_gflops,
    peak_memory_gib,
)

METHODS = {"lora": ["method=lora"], "qlora-4bit": ["method=qlora", "quant.bits=4"],
           "qlora-8bit": ["method=qlora", "quant.bits=8"], "full": ["method=full"],
           # the LoRA variants (issue 23): python bench/methods.py --methods lora,dora,rslora,loraplus
           "dora": ["method=lora", "lora.use_dora=true"], "rslora": ["method=lora", "lora.use_rslora=true"],
           "loraplus": ["method=lora", "train.loraplus_lr_ratio=16"], "pissa": ["method=lora", "lora.init=pissa_niter_4"]}


def one(method: str, shape: str, seq: int, steps: int, dtype: str) -> dict:
    """Train `steps` steps of one method in this process; return its figures."""
    import torch

    from lorakit.recipe import load_recipe
    from lorakit.training.run import run

    recipe_file = cpt_recipe(ensure_model(shape), seq, f"max_steps: {steps}, batch_size: 1, logging_steps: 1, "
                                                        f"lr: 1.0e-4, dtype: {dtype}")
    torch.manual_seed(0)
    out = run(load_recipe(recipe_file, METHODS[method]))
    tokens_per_s, final_loss = logged_speed(out)
    return {"method": method, "tokens_per_s": tokens_per_s, "peak_gib": peak_memory_gib(), "final_loss": final_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default="lora,qlora-4bit,qlora-8bit,full")
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.shape, args.seq, args.steps, args.dtype)), flush=True)
        return
    params, peak = flop_params(ensure_model(args.shape)), matmul_peak_gflops()
    rows = []
    for method in args.methods.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", method, "--shape", args.shape, "--seq",
                               str(args.seq), "--steps", str(args.steps), "--dtype", args.dtype],
                              capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        rows.append(json.loads(line[0][7:]))
        print(f"{method}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\nQwen2-{args.shape} shape, random weights, seq {args.seq}, batch 1, {args.steps} steps, "
          f"dtype {args.dtype}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores, on {device()}; bf16 matmul peak {peak:.0f} GFLOP/s; "
          f"peak memory = {PEAK_KIND[device()]}; MFU counts 4 x parameters per token (6 x for full)\n")
    print("| method | real tok/s | MFU vs bf16 peak | peak memory (GiB) |\n|---|---|---|---|")
    for r in rows:
        mfu = (6 if r["method"] == "full" else 4) * params * r["tokens_per_s"] / (peak * 1e9)
        print(f"| {r['method']} | {r['tokens_per_s']:.1f} | {100 * mfu:.0f}% | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
