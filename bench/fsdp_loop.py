"""FSDP on CPUs (issue 25), measured the one way it runs here. accelerate 1.15 turns FSDP on only for GPUs, so the
Trainer cannot run it on this machine (bench/strategies.py measures ddp, zero2 and zero3 through the Trainer). This
bench runs torch's own training loop, the same in every run, on the same global batch (2 rows of --seq tokens):

    one process             the loop alone
    2 processes, ddp        the model in torch's DistributedDataParallel
    2 processes, fsdp       the model sharded with lorakit's FSDP settings (training.sharding: fsdp_config, then
                            shard: FSDP2's fully_shard on each decoder layer, then the whole model)

    python bench/fsdp_loop.py --shape 0.5b --seq 512 --steps 6     # about 6 minutes on 2 CPU cores

Weights and compute in float32, LoRA r16 on every linear layer, AdamW. Tokens/s counts all processes' tokens over
the steps after the first. Memory, per process: the peak RSS of the whole run (which includes loading: each process
here loads the whole model before sharding it, where the Trainer's FSDP loads it on rank 0 only), and the peak while
training, counted from after the model was wrapped (torch.cuda.max_memory_allocated on a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from common import PEAK_KIND, device, ensure_model, peak_memory_gib, report, run_ranks

ROWS = 2


def child(model_path: str, mode: str, seq: int, steps: int) -> None:
    """One process: build, wrap (ddp or fsdp, under torchrun), train `steps` steps, report its figures."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.training.sharding import fsdp_config, shard

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    here = device() if world == 1 else (f"cuda:{os.environ['LOCAL_RANK']}" if device() == "cuda" else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device() == "cuda" else "gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(here)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        shard(model, fsdp_config(model), torch.float32)
        trainable = [p for p in model.parameters() if p.requires_grad]  # now each process's shards
    batch = torch.randint(3, 32000, (ROWS, seq), generator=torch.Generator().manual_seed(1))
    mine = batch.chunk(world)[rank].to(here)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loading_peak = peak_memory_gib()
    reset_peak()  # from here on: the training's own peak, not the loading's (every process loads the whole model)
    losses, started = [], 0.0
    for step in range(steps):
        if step == 1:  # the first step (allocation, first gathers) is left out of the timing
            if world > 1:
                dist.barrier()
            started = time.perf_counter()
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - started
    result = {"rank": rank, "peak_gib": max(loading_peak, training_peak()), "training_peak_gib": training_peak(),
              "tokens_per_s": ROWS * seq * (steps - 1) / seconds,
              "final_loss": losses[-1]}
    report(result)
    if world > 1:
        dist.destroy_process_group()


def reset_peak() -> None:
    """Start the peak anew: the heap's freed pages handed back, then Linux's high-water mark of this process's RSS
    reset (clear_refs 5, which resets getrusage's ru_maxrss too); on a GPU, torch's peak."""
    import gc

    import torch

    from lorakit.system.allocator import trim_heap

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    trim_heap()
    Path("/proc/self/clear_refs").write_text("5")


def training_peak() -> float:
    """The peak since reset_peak, GiB (VmHWM on a CPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return int(kib) / 2**20


def one(model, mode: str, seq: int, steps: int) -> list[dict]:
    return run_ranks(__file__, 1 if mode == "single" else 2, str(model), mode, str(seq), str(steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        model, mode, seq, steps = args.child
        return child(model, mode, int(seq), int(steps))
    model = ensure_model(args.shape)
    rows = []
    for mode, name in (("single", "1 process"), ("ddp", "2 processes, ddp"), ("fsdp", "2 processes, fsdp")):
        rows.append((name, one(model, mode, args.seq, args.steps)))
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nQwen2-{args.shape} shape, float32, LoRA r16 on every linear layer, torch's own loop, {args.steps} steps "
          f"of {ROWS} rows x {args.seq} tokens; {platform.machine()}, {os.cpu_count()} cores, {device()}; "
          f"peak: {PEAK_KIND[device()]}\n")
    print("| run | tokens/s (all processes) | peak per process, whole run (GiB) | peak per process while training "
          "(GiB) | final loss |")
    print("|---|---:|---:|---:|---:|")
    for name, results in rows:
        peaks, training = (" / ".join(f"{r[key]:.2f}" for r in results) for key in ("peak_gib", "training_peak_gib"))
        print(f"| {name} | {results[0]['tokens_per_s']:.1f} | {peaks} | {training} | {results[0]['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
