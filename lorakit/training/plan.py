"""`lorakit plan`: a run's peak memory, estimated from the model's config alone (no weights loaded).

The parts: the runtime itself, base weights (in the compute dtype, or 4/8-bit for QLoRA), trainable
parameters with their gradients and AdamW state, the activations kept for the backward pass (with and
without activation checkpointing), and the logits of the loss. The activation and runtime constants
were fitted to peaks measured with bench/plan_check.py (bench/RESULTS.md shows the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..recipe import Recipe
from ..stages import stage as stage_of
from .loss import CHUNK_TOKENS

GIB = 2**30
# Fitted on this project's CPU machine (bench/plan_check.py); see bench/RESULTS.md.
RUNTIME_BYTES = {"cpu": 0.75 * GIB, "cuda": 0.05 * GIB}
ACTIVATION_PER_TOKEN_LAYER = {"hidden": 16.0, "intermediate": 5.0}  # elements saved, per unit of width
# bitsandbytes' 4/8-bit matmuls keep more per token for the backward pass, and its dequantization
# needs workspace: fitted to the QLoRA runs of bench/plan_check.py (1.57x the activations, +0.33 GiB).
QLORA_ACTIVATION_FACTOR, QLORA_WORKSPACE = 1.57, 0.33 * GIB
# DoRA keeps each adapted layer's base output and its update's for the magnitudes' backward: fitted to the measured
# pair in bench/RESULTS.md (LoRA 3.13 GiB, DoRA 4.29 GiB at 512 tokens on the Qwen2-0.5B shape; the plan: 3.05, 4.20).
DORA_ACTIVATION_FACTOR = 2.3


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim,
                   bool(getattr(config, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def block_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        qkv_bias = (self.heads + 2 * self.kv_heads) * self.head_dim  # Qwen2's q/k/v projections have biases
        return (self.block_linear_params + self.embedding_params + self.layers * (2 * self.hidden + qkv_bias)
                + self.hidden)


def lora_params(shape: Shape, r: int, target, dora: bool = False, token_rows: int = 0) -> int:
    """Trainable parameters of a LoRA adapter: A and B of each adapted layer, DoRA's magnitude (one per output
    row), and one embedding row per trainable token."""
    names = shape.linears() if target == "all-linear" else {n: shape.linears()[n] for n in target
                                                            if n in shape.linears()}
    return shape.layers * sum(r * (i + o) + (o if dora else 0) for i, o in names.values()) + token_rows * shape.hidden


def estimate(shape: Shape, *, method: str, bits: int, r: int, target, dtype: torch.dtype, device: str,
             batch: int, seq: int, checkpointing: bool, reference: bool = False, dora: bool = False,
             token_rows: int = 0) -> dict[str, float]:
    """Bytes of each part of the peak; `reference`: a frozen copy of the model in the compute dtype (a preference
    stage's reference with method full); `dora`: DoRA's magnitudes and what its second pass keeps; `token_rows`:
    the number of trainable tokens."""
    width = torch.finfo(dtype).bits // 8
    other = shape.params - shape.block_linear_params
    if method == "qlora":  # linear weights in 4/8 bits (+ scales); the rest in fp32 after k-bit preparation
        weights = shape.block_linear_params * (0.53 if bits == 4 else 1.02) + other * 4
    elif method == "full":  # fp32 master weights, plus autocast's half-precision copies of them
        weights = shape.params * (4 + (width if width < 4 else 0))
    else:
        weights = shape.params * width
    trainable = shape.params if method == "full" else lora_params(shape, r, target, dora, token_rows)
    tokens = batch * seq
    # Packed fused attention keeps no seq x seq score matrices; what is kept grows with the tokens.
    per_layer = tokens * (ACTIVATION_PER_TOKEN_LAYER["hidden"] * shape.hidden
                          + ACTIVATION_PER_TOKEN_LAYER["intermediate"] * shape.intermediate) * width
    activations = shape.layers * per_layer
    checkpointed = shape.layers * tokens * shape.hidden * width + per_layer
    if method == "qlora":
        activations, checkpointed = activations * QLORA_ACTIVATION_FACTOR, checkpointed * QLORA_ACTIVATION_FACTOR
        weights += QLORA_WORKSPACE
    if dora:  # each adapted layer keeps its base output and its update's for the magnitudes' backward
        activations, checkpointed = activations * DORA_ACTIVATION_FACTOR, checkpointed * DORA_ACTIVATION_FACTOR
    logits = min(tokens, CHUNK_TOKENS) * shape.vocab * (4 + 4 + width)  # chunk logits and softmax in fp32, grad
    if token_rows and method != "full":
        # peft rebuilds the embedding matrix with the trained rows every step, and the chunked loss keeps the
        # head's gradient (the tied head is that matrix): two vocabulary-sized matrices in the compute dtype
        logits += 2 * shape.vocab * shape.hidden * width
    return {
        "runtime": RUNTIME_BYTES["cuda" if device.startswith("cuda") else "cpu"],
        "weights": weights,
        "trainable": 0 if method == "full" else trainable * 4,  # full: the fp32 weights are the trainable ones
        "gradients and AdamW state": trainable * 12,
        "activations": checkpointed if checkpointing else activations,
        "logits": logits,
        "reference": shape.params * width if reference else 0,
        "_activations_without": activations,
        "_activations_with": checkpointed,
        "_trainable_params": trainable,
    }


def total(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if not k.startswith("_"))


STRATEGIES = {"ddp": "every process holds the whole model",
              "fsdp": "weights, gradients and AdamW state sharded; a layer gathered at a time",
              "zero3": "DeepSpeed ZeRO-3: the same sharding"}


def per_process(shape: Shape, parts: dict[str, float], nproc: int, method: str, dtype: torch.dtype) -> dict[str, float]:
    """Each process's peak with `nproc` processes, each running the recipe's micro-batch, by train.strategy.

    ddp: everything, plus its gradient buckets (a second copy of the trainable gradients, fp32). fsdp and zero3:
    the weights (and a frozen reference), trainable parameters, gradients and AdamW state divided among the
    processes; gathered while computing, the root unit's embeddings and two decoder layers (the one running and
    the one prefetched). Arithmetic from the sharding, not measured (no GPU here; docs/distributed.md)."""
    width = torch.finfo(dtype).bits // 8
    sharded = parts["weights"] + parts["trainable"] + parts["gradients and AdamW state"] + parts["reference"]
    layer = shape.block_linear_params / shape.layers * (0.53 if method == "qlora" else width)
    gathered = shape.embedding_params * width + 2 * layer
    ddp = total(parts) + parts["_trainable_params"] * 4
    shard = total(parts) - sharded + sharded / nproc + gathered
    return {"ddp": ddp, "fsdp": shard, "zero3": shard}


def largest(fits, limit: int, step: int) -> int:
    """The largest multiple of `step` up to `limit` for which fits(value) holds, or 0 (fits grows monotone)."""
    best, value = 0, step
    while value <= limit and fits(value):
        best, value = value, value * 2
    low, high = best, min(value, limit + step)
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _settings(recipe: Recipe, device: str) -> dict:
    from ..weights.loading import resolve_dtype

    copy = recipe.method == "full" and stage_of(recipe.stage).reference and recipe.pref.reference == "live"
    return {"method": recipe.method, "bits": recipe.quant.bits, "r": recipe.lora.r, "target": recipe.lora.target,
            "dtype": resolve_dtype(recipe.train.dtype, device), "device": device, "reference": copy,
            "dora": recipe.lora.use_dora, "token_rows": len(recipe.lora.trainable_tokens)}


def plan(recipe: Recipe, budget: float | None = None, device: str | None = None, nproc: int = 1) -> dict:
    """The recipe's estimated peak, its parts, with `nproc` > 1 each process's under each strategy, and (with a
    budget in bytes) what fits."""
    from ..weights.folders import base_of
    from ..weights.loading import load_config, resolve_device

    device = device or resolve_device(recipe.train.device)
    config = load_config(recipe.model or base_of(recipe.parent), recipe.trust_remote_code)
    from .trainer import micro_batch

    shape, settings = Shape.of(config), _settings(recipe, device)
    # A preference row holds a pair: up to two sequences of data.max_length tokens.
    seq = recipe.data.max_length * (2 if stage_of(recipe.stage).preference else 1)
    batch, ckpt = micro_batch(recipe, device), recipe.train.gradient_checkpointing
    parts = estimate(shape, batch=batch, seq=seq, checkpointing=ckpt, **settings)
    report = {"shape": shape, "device": device, "dtype": settings["dtype"], "batch": batch, "seq": seq,
              "parts": parts, "total": total(parts),
              "total_without_checkpointing": total({**parts, "activations": parts["_activations_without"]}),
              "total_with_checkpointing": total({**parts, "activations": parts["_activations_with"]})}
    if nproc > 1:
        report["nproc"], report["per_process"] = nproc, per_process(shape, parts, nproc, recipe.method,
                                                                    settings["dtype"])
    if budget:
        def peak(b, s, c):
            return total(estimate(shape, batch=b, seq=s, checkpointing=c, **settings))
        report["budget"] = budget
        report["largest_batch"] = {c: largest(lambda b: peak(b, seq, c) <= budget, 4096, 1) for c in (False, True)}
        context = getattr(config, "max_position_embeddings", None) or 131072  # never suggest more than the model reads
        report["largest_seq"] = {c: largest(lambda s: peak(batch, s, c) <= budget, context, 64) for c in (False, True)}
        report["context"] = context
    return report


def format_plan(name: str, recipe: Recipe, report: dict) -> str:
    gib = lambda b: f"{b / GIB:6.2f} GiB"
    s, parts = report["shape"], report["parts"]
    lines = [f"plan for {name}: {recipe.method} on {recipe.model or recipe.parent} ({s.params / 1e6:.0f}M parameters), "
             f"{str(report['dtype']).removeprefix('torch.')} on {report['device']}, {report['batch']} row(s) of "
             f"{report['seq']} tokens at once (batch {recipe.train.batch_size})"]
    labels = {"runtime": "runtime (torch and libraries)", "weights": "base weights",
              "trainable": f"trainable parameters ({parts['_trainable_params'] / 1e6:.1f}M, fp32)",
              "gradients and AdamW state": "gradients + AdamW state", "activations": "activations",
              "logits": "logits (chunked loss)", "reference": "reference model (frozen copy, full)"}
    for key, label in labels.items():
        if key == "reference" and not parts[key]:
            continue
        lines.append(f"  {label:<42} {gib(parts[key])}")
    lines.append(f"  {'expected peak':<42} {gib(report['total'])}   (activation checkpointing "
                 f"{'on' if recipe.train.gradient_checkpointing else 'off'})")
    lines.append(f"  {'without / with activation checkpointing':<42} {gib(report['total_without_checkpointing'])}"
                 f" / {report['total_with_checkpointing'] / GIB:.2f} GiB")
    if "per_process" in report:
        lines.append(f"per process, with {report['nproc']} processes ({report['batch']} row(s) each at once):")
        for strategy, why in STRATEGIES.items():
            marker = "  (the recipe's)" if strategy == recipe.train.strategy else ""
            lines.append(f"  {strategy:<6} {why:<70} {gib(report['per_process'][strategy])}{marker}")
    if "budget" in report and "per_process" in report:
        fit = [s for s, peak in report["per_process"].items() if peak <= report["budget"]]
        lines.append(f"budget {report['budget'] / GIB:.2f} GiB per process: "
                     + (f"fits with train.strategy {', '.join(fit)}" if fit else "fits with no strategy")
                     + (f"; not with {', '.join(s for s in STRATEGIES if s not in fit)}" if 0 < len(fit) < 3 else ""))
    if "budget" in report:
        fits = report["total"] <= report["budget"]
        alone = " in one process" if "per_process" in report else ""
        lines.append(f"budget {report['budget'] / GIB:.2f} GiB{alone}: {'fits' if fits else 'does NOT fit'}")
        for c in (False, True):
            how = "with" if c else "without"
            lines.append(f"  {how} checkpointing: at most {report['largest_batch'][c]} rows of {report['seq']} "
                         f"tokens at once (train.micro_batch_size); at most {report['largest_seq'][c]} tokens "
                         f"{'(the model context) ' if report['largest_seq'][c] >= report['context'] else ''}"
                         f"per row at {report['batch']} row(s) (data.max_length)")
    return "\n".join(lines)


def free_memory(device: str) -> float:
    """Bytes the device can still give this process."""
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info()[0])
    import psutil

    return float(psutil.virtual_memory().available)


def parse_size(text: str, option: str = "--budget") -> float:
    """"8GB", "512MiB", "1e9" -> bytes (binary units)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        size = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        size = float("nan")
    if not size > 0 or size == float("inf"):
        from ..errors import LorakitError

        raise LorakitError(f"{option} {text!r}: expected a size like 8GB or 512MB")
    return size
