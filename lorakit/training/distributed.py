"""Several processes through the established launcher (torchrun) and engines (DDP, FSDP, DeepSpeed
through accelerate and the Trainer); lorakit only picks the right settings and checks the result.

    lorakit train RECIPE --nproc 2      re-runs itself as `python -m lorakit.training.torchrun
                                        --nproc_per_node 2 -m lorakit train RECIPE` (torchrun, quiet
                                        after a process's own error line: training/torchrun.py)
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from ..errors import LorakitError, first_line
from ..log import is_main

EXPECTED = "LORAKIT_EXPECTED_WORLD_SIZE"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """Each process its own GPU (torchrun's LOCAL_RANK); CPU processes share the CPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` in `nproc` processes under torchrun; return its exit code."""
    if world_size() > 1:
        raise LorakitError("--nproc inside an already distributed run: launch lorakit once")
    cores = os.cpu_count() or 1
    env = {**os.environ, EXPECTED: str(nproc)}
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # share the cores, not oversubscribe
    command = [sys.executable, "-m", "lorakit.training.torchrun", "--nproc_per_node", str(nproc),
               "-m", "lorakit", *argv]
    return subprocess.call(command, env=env)


def end_process_group() -> None:
    """Shut the process group down before the process exits: a rank that left with gloo's threads
    still running aborted at exit now and then ("terminate called without an active exception").
    destroy_process_group only drops torch's own references to the group; the trained model's DDP
    wrapper and the Trainer sit in reference cycles that hold it too, and were freed only during the
    interpreter's teardown, where gloo's work objects abort. Collecting them while the interpreter is
    whole ended it: rank 1 of a 2-process DPO run aborted in 4 of 28 runs before, in none of 40 after."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        gc.collect()
        torch.distributed.destroy_process_group()
        gc.collect()


def check_world() -> None:
    """Refuse a run that asked for N processes but got another number (a launcher quietly running one)."""
    expected = os.environ.get(EXPECTED)
    if expected and int(expected) != world_size():
        raise LorakitError(f"{expected} processes were asked for, but this run has {world_size()}; "
                           f"launch with torchrun --nproc_per_node {expected} (accelerate: --multi_gpu)")


def check_strategy(strategy: str, device: str) -> None:
    """Refuse, before any process starts, a strategy this machine cannot run."""
    if strategy == "fsdp" and not device.startswith("cuda"):
        # Measured here: accelerate 1.15 turns FSDP on only for GPU devices; on CPU ranks the Trainer quietly drops
        # the FSDP settings and trains plain DDP. (DeepSpeed's CPU accelerator does run ZeRO-2 and ZeRO-3 over gloo.)
        raise LorakitError(f"train.strategy {strategy} needs GPUs; on CPUs use strategy: ddp, zero2 or zero3")
    if strategy.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise LorakitError(f"train.strategy {strategy} needs DeepSpeed: pip install deepspeed")


def trainer_options(strategy: str, device: str, model) -> dict:
    """TrainingArguments for the strategy; nothing at all for a single process."""
    if world_size() == 1:
        return {}
    check_strategy(strategy, device)
    options = {"ddp_backend": "nccl" if device.startswith("cuda") else "gloo", "ddp_find_unused_parameters": False}
    if strategy == "fsdp":
        from .sharding import fsdp_config

        options.update(fsdp="full_shard auto_wrap", fsdp_config=fsdp_config(model))
    elif strategy.startswith("zero"):
        # ZeRO-3 partitions every weight: gathered into whole 16-bit tensors when the model is saved
        zero = {"stage": int(strategy[-1]), **({"stage3_gather_16bit_weights_on_model_save": True}
                                              if strategy == "zero3" else {})}
        options["deepspeed"] = {"zero_optimization": zero, "bf16": {"enabled": "auto"},
                                "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    return options


def check_engine(trainer, strategy: str) -> None:
    """The engine asked for is the one running: no silent fallback to plain DDP."""
    if world_size() == 1:
        return
    running = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "ddp"
    wanted = "deepspeed" if strategy.startswith("zero") else strategy
    if running != wanted:
        raise LorakitError(f"train.strategy {strategy} was asked for, but the Trainer set up {running}")


def storage_shared(folder: Path) -> bool:
    """Whether every process of the run sees `folder` on one filesystem (always, on one machine): rank 0 leaves a
    file there and the others look for it. Where machines have disks of their own, each keeps the checkpoints it
    resumes from (the Trainer's save_on_each_node); on a shared one, only rank 0 writes them."""
    if world_size() == 1 or int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) == world_size():
        return True
    import torch.distributed as dist

    token = [uuid.uuid4().hex if is_main() else None]
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".lorakit-probe-{token[0]}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
    dist.barrier()
    seen = _every_rank(probe.exists())
    dist.barrier()
    if is_main():
        probe.unlink(missing_ok=True)
    return all(seen)


def check_same_checkpoint(checkpoint: Path | None) -> None:
    """Every process resumes from the same step: a machine that lacks rank 0's checkpoint (its disk lost, or a run
    started before lorakit kept checkpoints on each machine) is named instead of training on from step 0."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return
    steps = _every_rank(checkpoint.name if checkpoint else None)
    if len(set(steps)) != 1:
        found = ", ".join(f"rank {rank}: {step or 'none'}" for rank, step in enumerate(steps))
        raise LorakitError(f"--resume: the processes found different checkpoints ({found}); every machine needs the "
                           f"same checkpoint in its run folder (copy rank 0's there, or start again)")


def lost_process(exc: BaseException, step: int, last: Path | None) -> LorakitError | None:
    """A training error that is the process group losing a member (a machine that died, a killed rank; gloo and
    NCCL raise it in the collective that waited for it) as one line saying how to go on; None for any other."""
    text = str(exc)
    if world_size() == 1 or not (isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
            sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))):
        return None
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc)).split(". ")[0]  # gloo's source location dropped
    return LorakitError(f"another process of this run stopped answering at step {step} (a machine or process died: "
                        f"{cause[:160]}); nothing was written. " + (
                            f"The last checkpoint is {last}: start every machine again with --resume" if last else
                            "No checkpoint was written yet: start again"))


def check_ranks_agree(model) -> str | None:
    """After training, every rank must hold the same trainable weights; returns their checksum."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return None
    total = sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item()
                for p in model.parameters() if p.requires_grad)
    sums = _every_rank(total)
    if len(set(sums)) != 1:
        raise LorakitError(f"the {world_size()} processes ended with different weights (checksums {sums}); "
                           f"nothing was saved")
    return f"{sums[0]:.10g}"


def _every_rank(value) -> list:
    """`value` as each process of the run has it, by rank (a collective: every process calls it)."""
    values = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values
