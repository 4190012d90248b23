"""The `lora` section of a recipe: rank, scale, targets, and the variants people switch on (DoRA, rsLoRA,
peft's initialisations, trainable tokens). What each variant becomes in peft, how its adapter is written and
where it can be served is weights/variants.py; here are only the settings and the checks of their values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LorakitError

# The output head is applied by lorakit's chunked loss and the embeddings are tied to it in small Qwen2
# models; a LoRA on either would be skipped by that loss or break the tie.
OUTSIDE_THE_BLOCKS = ("lm_head", "embed_tokens")

# peft's initialisations that need nothing but the weights (pissa_niter_<n> too: PiSSA by a fast randomised SVD).
INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")
# the others, and why a recipe cannot ask for them
NOT_OFFERED = {
    "eva": "it needs the training data's activations before the adapter exists",
    "corda": "it needs the training data's activations before the adapter exists",
    "lora_ga": "it needs gradients of the training data before the adapter exists",
    "loftq": "it quantizes the base itself (use method: qlora for a quantized base)",
    "mica": "it freezes B, which no lorakit export is checked against yet",
}


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Rank of each LoRA update."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training. Off by default: each module would keep a dropped-out
    copy of its input for the backward pass (gigabytes at 1024-token batches) for little gain on the
    few epochs of a fine-tune."""
    target: str | list[str] = "all-linear"
    """Modules to adapt: "all-linear" (every linear layer of the blocks, not the output head) or a
    list of module names such as [q_proj, v_proj]."""
    use_dora: bool = False
    """DoRA: each adapted weight is split into a magnitude (one trained number per output row) and a direction
    (the LoRA update). Costs the magnitudes (out_features per layer) and, every step, the norm of each
    adapted weight and a second pass through the base layer's weight (bench/RESULTS.md). Merges and merged
    exports are exact; vLLM and llama.cpp's LoRA GGUF cannot apply it (refused: export it merged)."""
    use_rslora: bool = False
    """rsLoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r, so higher ranks keep learning.
    Free at run time; served everywhere (llama.cpp's GGUF adapter gets its scale as alpha x sqrt(r) / r)."""
    init: str = "default"
    """How A and B start: default (A random, B zero: the update starts at nothing), gaussian, orthogonal
    (even r), pissa (A and B from the weight's principal singular vectors; pissa_niter_<n> for a fast
    randomised SVD), olora (from a QR decomposition). pissa and olora move that part out of the base while
    training; the adapter is converted when written so that it applies to the original base, at twice
    the rank."""
    trainable_tokens: list[str] = field(default_factory=list)
    """Tokens whose embedding rows train with the adapter (peft's trainable tokens): special tokens the data
    uses, such as a chat template's markers or a tool-call tag, already in the tokenizer's vocabulary.
    Costs one embedding row per token; where the head shares the embeddings (tied), its row trains too.
    Merges exactly; vLLM and llama.cpp's LoRA GGUF cannot apply it (refused: export it merged)."""

    def __post_init__(self):
        if self.r < 1:
            raise LorakitError(f"lora.r must be a positive integer, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise LorakitError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target, list):
            if not self.target:
                raise LorakitError("lora.target must name at least one module, or be all-linear")
            outside = [name for name in self.target if name in OUTSIDE_THE_BLOCKS]
            if outside:
                raise LorakitError(f"lora.target {outside[0]}: only the linear layers inside the blocks can be "
                                   f"adapted (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); "
                                   f"to train a few tokens' embeddings use lora.trainable_tokens, the whole "
                                   f"embeddings and output head train with method: full")
        self._check_init()
        if len(set(self.trainable_tokens)) != len(self.trainable_tokens) or "" in self.trainable_tokens:
            raise LorakitError(f"lora.trainable_tokens {self.trainable_tokens}: name each token once")

    def _check_init(self) -> None:
        init = self.init
        if init in INITS or re.fullmatch(r"pissa_niter_\d+", init):
            if init == "orthogonal" and self.r % 2:
                raise LorakitError(f"lora.init orthogonal needs an even lora.r, got {self.r}")
            return
        if init in NOT_OFFERED:
            raise LorakitError(f"lora.init {init}: not offered by lorakit, as {NOT_OFFERED[init]}")
        raise LorakitError(f"lora.init {init!r}: expected one of {', '.join(INITS)} or pissa_niter_<n>")

    @property
    def rewrites_base(self) -> bool:
        """PiSSA and OLoRA subtract their starting update from the base weights while training."""
        return self.init.startswith("pissa") or self.init == "olora"

    @property
    def variants(self) -> list[str]:
        """The variants switched on, as the messages name them."""
        return ([self.init.split("_niter_")[0].replace("pissa", "PiSSA").replace("olora", "OLoRA")]
                if self.init != "default" else []) + [name for name, on in (
            ("DoRA", self.use_dora), ("rsLoRA", self.use_rslora), ("trainable tokens", bool(self.trainable_tokens)))
            if on]
