"""Run by tests/test_distributed.py, alone or under torchrun: a tiny model with a LoRA adapter, sharded with the
FSDP settings lorakit gives the Trainer (training.sharding: fsdp_config, then shard as accelerate applies it),
trained on one fixed global batch split among the processes. Writes the loss curve, what was sharded, and (rank 0)
the adapter from the gathered full state dict.

    python tests/fsdp_worker.py MODEL OUT                     # one process, no FSDP
    torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL OUT
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit.training.sharding import fsdp_config, full_state_dict, shard

STEPS, ROWS, LENGTH = 8, 4, 24


def main(model_path: str, out: str) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    sharded = {}
    if world > 1:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        shard(model, fsdp_config(model), torch.float32)
        sharded = {"units": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
                   "trainable_sharded": all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad),
                   "frozen_sharded": all(isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad),
                   "frozen_still_frozen": sum(not p.requires_grad for p in model.parameters())}
    batch = torch.randint(3, model.config.vocab_size, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    mine = batch.chunk(world)[rank]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()  # FSDP reduce-scatters the gradients, averaged over the processes
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    state = full_state_dict(model) if world > 1 else model.state_dict()
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        (Path(out) / "result.json").write_text(json.dumps({"losses": losses, **sharded}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
