"""What lorakit asks of FSDP, in one place: which modules are sharded as units, the mixed precision, and the full
state dict gathered when saving. The Trainer path hands `fsdp_config` to accelerate (FSDP2, the default of the
installed transformers and accelerate); `shard` applies the same settings with torch's own `fully_shard`, as
accelerate's FSDP2 preparation does, so that they can be proven where accelerate will not run FSDP: accelerate
1.15 enables FSDP only for GPU devices, and on CPU ranks the Trainer quietly trains DDP instead
(tests/test_distributed.py runs `shard` over gloo on CPU against one process)."""

from __future__ import annotations

import torch

from ..errors import LorakitError


def units(model) -> list[str]:
    """The module classes sharded as FSDP units: the decoder layers (transformers' `_no_split_modules`, such as
    Qwen2DecoderLayer). A unit holds its layer's frozen base weights and the LoRA A and B inside it together: FSDP2
    keeps each parameter's requires_grad, so the frozen and trainable ones share a unit."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = sorted(set(getattr(inner, "_no_split_modules", None) or []))
    if not names:
        raise LorakitError(f"{type(inner).__name__} names no decoder layer class (_no_split_modules): FSDP cannot "
                           f"tell which modules to shard; use train.strategy: ddp")
    return names


def fsdp_config(model) -> dict:
    """The Trainer's `fsdp_config`: FSDP2, the decoder layers as units, resharded after each forward, the full
    state dict gathered for saving, and the base loaded once (rank 0) and sent to the others."""
    return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": units(model),
            "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True}


def mixed_precision(dtype: torch.dtype):
    """As accelerate sets it from the Trainer's bf16/fp16: compute and gradient reduction in the training dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)


def shard(model, config: dict, dtype: torch.dtype):
    """`model` sharded in place with torch's fully_shard from `config` (fsdp_config's): each unit bottom-up, then the
    root, as accelerate's FSDP2 preparation applies the same settings."""
    from torch.distributed.fsdp import fully_shard

    wrap = set(config["transformer_layer_cls_to_wrap"])
    options = {"reshard_after_forward": config["reshard_after_forward"], "mp_policy": mixed_precision(dtype)}
    for module in reversed(list(model.modules())):
        if type(module).__name__ in wrap:
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def full_state_dict(model) -> dict:
    """Every parameter whole, on the CPU (FULL_STATE_DICT): what rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unpartition(engine, model) -> None:
    """After ZeRO-3 training, where every process holds a partition of each weight: all processes gather the
    weights one module at a time, and rank 0 keeps whole copies in place of the partitioned parameters (ties kept),
    then DeepSpeed's hooks are removed, so rank 0 holds a plain model to probe and write (the others keep nothing).
    Written here because DeepSpeed gathers weights only into its own checkpoint files or a 16-bit state dict, and
    lorakit's save needs the trained model itself, to prove that the written adapter reproduces its logits."""
    import deepspeed

    from ..log import is_main

    whole: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if hasattr(p, "ds_id")]
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            for name, p in own:
                if is_main():
                    if id(p) not in whole:
                        whole[id(p)] = torch.nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad)
                    module._parameters[name] = whole[id(p)]
    engine.destroy()  # DeepSpeed's fetch hooks off the modules
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # later loads (the reload check) are plain ones again
