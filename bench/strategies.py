"""Training beyond one process (issue 25): tokens/s and each process's peak memory for one process against two
under DDP, DeepSpeed ZeRO-2 and ZeRO-3, on the same global batch (2 rows of --seq tokens per step).

    python bench/strategies.py --shape 0.5b --seq 512 --steps 6     # about 5 minutes on 2 CPU cores
    python bench/strategies.py --strategies ddp,fsdp,zero2,zero3    # on a machine with 2 GPUs (bench/gpu.sh)

Each configuration is a fresh `lorakit train` (two processes: under torchrun, each with its share of the cores).
Tokens/s counts the tokens of all processes between the first and the last logged step. Peak memory: each
process's peak RSS on a CPU, torch.cuda.max_memory_allocated on a GPU. FSDP needs GPUs (accelerate runs it only
there), so on a CPU it is left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from common import (
    PEAK_KIND,
    cpt_recipe,
    device,
    ensure_model,
    logged_speed,
    peak_memory_gib,
    report,
    run_ranks,
)


def child(recipe: str, overrides: list[str]) -> None:
    """One process of a run (alone, or a rank under torchrun): train, then print this process's figures."""
    from lorakit.recipe import load_recipe
    from lorakit.training.run import RunOptions, run

    out = run(load_recipe(recipe, overrides), RunOptions(overwrite=True))
    result = {"rank": int(os.environ.get("RANK", "0")), "peak_gib": peak_memory_gib()}
    if result["rank"] == 0:
        result["tokens_per_s"], result["final_loss"] = logged_speed(out)
    report(result)


def one(recipe, nproc: int, strategy: str, seq_batch: int) -> list[dict]:
    return run_ranks(__file__, nproc, str(recipe), f"train.batch_size={seq_batch // nproc}",
                     f"train.strategy={strategy}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--strategies", default="ddp,zero2,zero3")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        recipe, *overrides = args.child
        return child(recipe, overrides)
    recipe = cpt_recipe(ensure_model(args.shape), args.seq, f"max_steps: {args.steps}, batch_size: 2, "
                                                            f"logging_steps: 1, lr: 1.0e-4")
    rows = [("1 process", one(recipe, 1, "ddp", 2))]
    for strategy in args.strategies.split(","):
        rows.append((f"2 processes, {strategy}", one(recipe, 2, strategy, 2)))
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nQwen2-{args.shape} shape, LoRA r16 on every linear layer, {args.steps} steps of 2 rows x {args.seq} "
          f"tokens; {platform.machine()}, {os.cpu_count()} cores, {device()}; peak: {PEAK_KIND[device()]}\n")
    print("| run | tokens/s (all processes) | peak memory per process (GiB) | final loss |")
    print("|---|---:|---:|---:|")
    for name, results in rows:
        peaks = " / ".join(f"{r['peak_gib']:.2f}" for r in results)
        print(f"| {name} | {results[0]['tokens_per_s']:.1f} | {peaks} | {results[0]['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
