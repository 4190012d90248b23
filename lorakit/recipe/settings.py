"""The recipe's settings: frozen dataclasses, every default documented under its field (a recipe lists
only what differs). Reading YAML into them, with the checks that name a wrong key: loading.py."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import LorakitError
from .lora import LoraSettings


@dataclass(frozen=True)
class DataSource:
    """One entry of a `data.path` list: several datasets in one run, mixed by weight."""

    path: str
    """As data.path: a file, folder, glob, save_to_disk folder or `hf:org/name`."""
    weight: float | None = None
    """This source's share of the examples (weights are normalised to shares). None: give no weight to any
    source, and every example of every source is used once."""
    field: str | None = None
    """The record field holding the text or messages in this source (default: data.field)."""
    split: str | None = None
    """A hub or save_to_disk dataset's split (default: data.split)."""


@dataclass(frozen=True)
class DataSettings:
    path: str | list[str | dict]
    """A file (.txt, .json, .jsonl, .parquet, each also .gz or .zst), a folder of them (any other file in
    it is named in a note), a glob pattern (corpus/*.jsonl.gz), a folder written by datasets'
    save_to_disk, or a hub dataset `hf:org/name`. Read from the folder lorakit runs in.

    Or a list of sources, each a path or {path, weight, field, split}: with weights, each source makes
    that share of the examples (sampled without replacement; a source asked for more examples than it
    holds is repeated whole, then sampled for the rest); an epoch is as many examples as the sources hold
    together. Without weights the sources are simply read one after another. Records are recognised per
    record (text, messages, ShareGPT, Alpaca), so sources may differ in format."""
    max_length: int = 1024
    """Tokens per training sequence. CPT documents longer than this are split into blocks, never cut;
    SFT conversations longer than this are truncated (and checked to keep trained tokens); so is each prompt +
    answer of a preference pair, and a packed row of pairs holds up to this many tokens (a longer pair has a
    row of its own)."""
    packing: bool = True
    """Pack several short examples into one sequence (attention never crosses examples) so no
    compute is spent on padding. Off: one example per row, padded per batch."""
    system_prompt: str | None = None
    """SFT only. Inserted when a conversation has no system turn. None: the prompt the model's own
    chat template would insert (Qwen2: "You are a helpful assistant."); "": an empty system turn."""
    eval_path: str | None = None
    """Held-out data in the same format: eval loss and perplexity are logged and kept in the manifest."""
    eval_split: float = 0.0
    """Instead of eval_path: hold out this share of the training examples (seeded by train.seed)."""
    cache_dir: str | None = None
    """Where tokenized, packed rows are kept between runs (null: ~/.cache/lorakit/data, or under
    $XDG_CACHE_HOME). A run on the same data and settings reads them instead of tokenizing again."""
    num_proc: int = 0
    """Processes that tokenize the data; 0: one per core this process may use."""
    streaming: bool = False
    """Tokenize while training reads (nothing prepared ahead, nothing cached): for corpora larger than
    the disk cache. Needs train.max_steps; evaluation then needs data.eval_path (not eval_split)."""
    split: str = "train"
    """For a hub dataset or a save_to_disk folder with several splits: the split to train on."""
    field: str | None = None
    """The record field holding the text (CPT) or the messages (SFT), when it is not `text` / `messages`."""
    reasoning: str = "keep"
    """SFT, for a chat template with a reasoning block (Qwen3's <think>...</think>): what the examples keep.
    keep: each assistant turn's reasoning (its `reasoning_content`, or a <think> block opening its content),
    and for a turn without any, the block as the template writes it (empty); inference thinks first.
    empty: every turn gets the empty block and its reasoning is dropped; inference renders prompts with
    thinking off (enable_thinking: false), as the template's non-thinking mode does.
    none: no block at all, the reasoning dropped; the model learns to answer at once.
    chat, generate, serve and the exports' templates use the adapter's choice by default."""

    @property
    def sources(self) -> list[DataSource]:
        """data.path as a list of sources (one, for a plain path), with data.field and data.split filled in."""
        entries = self.path if isinstance(self.path, list) else [self.path]
        found = []
        for entry in entries:
            source = DataSource(entry) if isinstance(entry, str) else DataSource(**entry)
            found.append(dataclasses.replace(source, field=source.field or self.field, split=source.split or self.split))
        return found

    @property
    def label(self) -> str:
        """data.path for messages: the path, or the sources' paths joined."""
        return " + ".join(s.path for s in self.sources)

    def __post_init__(self):
        self._check_sources()
        if self.max_length < 8:
            raise LorakitError(f"data.max_length must be at least 8, got {self.max_length}")
        if not 0 <= self.eval_split < 1:
            raise LorakitError(f"data.eval_split must be in [0, 1), got {self.eval_split}")
        if self.eval_split and self.eval_path:
            raise LorakitError("give data.eval_path or data.eval_split, not both")
        if self.num_proc < 0:
            raise LorakitError(f"data.num_proc must be 0 (one per core) or more, got {self.num_proc}")
        if self.reasoning not in ("keep", "empty", "none"):
            raise LorakitError(f"data.reasoning must be keep, empty or none, got {self.reasoning!r}")
        if self.streaming and self.eval_split:
            raise LorakitError("data.streaming cannot hold out data.eval_split (a stream is read once); give "
                               "data.eval_path instead")

    def _check_sources(self) -> None:
        if not isinstance(self.path, list):
            return
        if not self.path:
            raise LorakitError("data.path: an empty list names no data")
        if self.streaming and len(self.path) > 1:
            raise LorakitError("data.streaming reads one source; mixing several (data.path as a list) needs them "
                               "prepared: turn data.streaming off")
        names = [f.name for f in dataclasses.fields(DataSource)]
        for i, entry in enumerate(self.path):
            where = f"data.path[{i}]"
            if isinstance(entry, str):
                continue
            unknown = [k for k in entry if k not in names]
            if unknown:
                raise LorakitError(f"{where}: unknown key {unknown[0]!r}; a source has {', '.join(names)}")
            if not isinstance(entry.get("path"), str) or not entry["path"]:
                raise LorakitError(f"{where}: needs `path`, a file, folder, glob or hf:org/name")
            weight = entry.get("weight")
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                       or not math.isfinite(weight) or weight <= 0):
                raise LorakitError(f"{where}.weight must be a positive number, got {weight!r}")
            for key in ("field", "split"):
                if entry.get(key) is not None and not isinstance(entry[key], str):
                    raise LorakitError(f"{where}.{key} must be a string, got {entry[key]!r}")
        weighted = [self._weight(e) is not None for e in self.path]
        if any(weighted) and not all(weighted):
            missing = weighted.index(False)
            raise LorakitError(f"data.path[{missing}]: give every source a weight, or none (then each example is "
                               f"used once)")

    @staticmethod
    def _weight(entry) -> float | None:
        return entry.get("weight") if isinstance(entry, dict) else None


SERVING_ENGINES = ("vllm", "llama.cpp", "ollama", "peft")
REPORTS = ("none", "tensorboard", "wandb", "mlflow", "trackio")
STAGES = ("cpt", "sft", "dpo", "kto", "orpo", "simpo")
"""The training stages (one module each in lorakit/stages/, registered there)."""
PREFERENCE_STAGES = ("dpo", "kto", "orpo", "simpo")
PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
                     "sigmoid_norm")
"""DPO's losses, by trl's names (trl.DPOConfig.loss_type)."""


@dataclass(frozen=True)
class PrefSettings:
    """The preference stages (dpo, kto, orpo, simpo): the loss and its weights. Names follow trl's configs."""

    beta: float | None = None
    """How far the adapter may move from the reference (DPO, KTO), or the scale of the rewards (ORPO's lambda,
    SimPO's beta). None: the stage's own default (dpo 0.1, kto 0.1, orpo 0.1, simpo 2.0)."""
    loss: str | list[str] = "sigmoid"
    """dpo: trl's loss_type, or a list of them summed with loss_weights: sigmoid (DPO), hinge (SLiC), ipo,
    robust (with label_smoothing), bco_pair, nca_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm."""
    loss_weights: list[float] | None = None
    """dpo: a weight per entry of `loss` (None: 1 each)."""
    sft_weight: float = 0.0
    """The chosen answer's negative log-likelihood (mean per token) added with this weight: trl's "sft" loss,
    LLaMA-Factory's pref_ftx, CPO's alpha. 0: the pure preference loss. ORPO's own NLL term is always on."""
    label_smoothing: float = 0.0
    """dpo robust and simpo: the assumed share of pairs whose labels are flipped (cDPO)."""
    simpo_gamma: float = 0.5
    """simpo: the target margin between the chosen and rejected answers' average log-probabilities (x beta)."""
    desirable_weight: float = 1.0
    """kto: the weight of the losses of desirable (label true) completions."""
    undesirable_weight: float = 1.0
    """kto: the weight of the losses of undesirable (label false) completions."""
    reference: Literal["live", "precomputed"] = "live"
    """dpo, kto: where the reference log-probabilities come from. live: a second forward pass each step through
    the same model with the adapter switched off (no second model in memory; the parent chain stays applied;
    method full keeps an explicit frozen copy). precomputed: one pass over the data before training, kept in
    the data cache beside the rows (later runs reuse it); training then runs one forward pass per step."""

    @property
    def losses(self) -> list[str]:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    def __post_init__(self):
        unknown = [name for name in self.losses if name not in PREFERENCE_LOSSES]
        if unknown or not self.losses:
            raise LorakitError(f"pref.loss {unknown[0] if unknown else self.loss!r}: expected one or more of "
                               f"{', '.join(PREFERENCE_LOSSES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.losses):
            raise LorakitError(f"pref.loss_weights has {len(self.loss_weights)} weight(s) for {len(self.losses)} "
                               f"loss(es) in pref.loss")
        if self.beta is not None and self.beta <= 0:
            raise LorakitError(f"pref.beta must be positive, got {self.beta}")
        for name in ("sft_weight", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise LorakitError(f"pref.{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LorakitError(f"pref.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
@dataclass(frozen=True)
class QuantSettings:
    bits: Literal[4, 8] = 4
    """method: qlora only. 4: the base is stored in 4 bits (QLoRA); 8: LLM.int8()."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NF4 (normal-float, the QLoRA paper's) or FP4."""
    double_quant: bool = True
    """Quantize the 4-bit scales too (about 0.4 bits per weight saved)."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 3
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 trains for `epochs`."""
    lr: float = 2e-4
    """Peak learning rate."""
    batch_size: int = 4
    """Sequences per device per step."""
    grad_accum: int = 1
    """Batches accumulated per optimizer step: an optimizer step sees batch_size x grad_accum rows."""
    micro_batch_size: int = 0
    """Rows processed at once; each batch is split into micro-batches of this size (same gradients,
    accumulated). 0: automatic, about 1024 tokens at once on a CPU (as fast as larger batches there,
    at a fraction of the memory) and the whole batch on a GPU."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    loraplus_lr_ratio: float = 0
    """LoRA+ (peft's optimizer): the B matrices (and DoRA's magnitudes) learn this many times faster than
    the A matrices, which keep train.lr; the paper suggests 16 with a somewhat lower lr. 0: off (one lr)."""
    seed: int = 42
    """Seeds weights of new adapters, dropout and data order."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype. auto: bf16 on a GPU that supports it and on a CPU with native bf16 (AVX512-BF16 or
    AMX), fp16 on an older GPU, fp32 on other CPUs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train. auto: the GPU when there is one."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third slower."""
    logging_steps: int = 1
    """Log loss, learning rate and tokens/s every this many steps."""
    eval_steps: int = 0
    """With eval data: evaluate every this many steps; 0 evaluates at the end of each epoch."""
    save_steps: int = 200
    """Checkpoint (adapter, optimizer, scheduler, RNG states, data position) every this many steps,
    for `lorakit train --resume`; 0 turns these periodic checkpoints off. Ctrl-C and SIGTERM always
    checkpoint, and so does the end of training: that last checkpoint is kept until the adapter is
    published, so a failure while writing it loses nothing."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    report_to: str | list[str] = "none"
    """Also log to transformers' integrations: tensorboard, wandb, mlflow, trackio (or a list of them);
    none: only metrics.jsonl and loss.png. TensorBoard's event files are kept in the adapter's runs/."""
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"
    """With several processes (--nproc, torchrun, accelerate launch): ddp replicates the model;
    fsdp shards it (full shard); zero2 / zero3 are DeepSpeed ZeRO stages (needs `pip install deepspeed`)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise LorakitError(f"train.lr must be positive, got {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise LorakitError(f"train.epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "logging_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LorakitError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise LorakitError(f"train.micro_batch_size must divide train.batch_size ({self.batch_size}), "
                               f"got {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise LorakitError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range, which the Trainer's set_seed uses
            raise LorakitError(f"train.seed must be in 0 .. 4294967295, got {self.seed}")
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        unknown = [r for r in reports if r not in REPORTS]
        if unknown or not reports:
            raise LorakitError(f"train.report_to {unknown[0] if unknown else reports!r}: expected one or more of "
                               f"{', '.join(REPORTS)}")
        if self.loraplus_lr_ratio and self.loraplus_lr_ratio < 1:
            raise LorakitError(f"train.loraplus_lr_ratio must be at least 1 (B learns faster than A), or 0 for off; "
                               f"got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio and self.strategy != "ddp":
            raise LorakitError(f"train.loraplus_lr_ratio with strategy {self.strategy}: LoRA+ is built for one "
                               f"process or ddp here; the sharded engines build their own optimizer")
        for name in ("save_steps", "eval_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise LorakitError(f"train.{name} must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class Recipe:
    stage: Literal["cpt", "sft", "dpo", "kto", "orpo", "simpo"]
    """cpt: raw text, loss on every token. sft: conversations, loss on assistant tokens only. dpo, orpo, simpo:
    pairs of a chosen and a rejected answer to one prompt; kto: single answers labelled good or bad (see `pref`)."""
    data: DataSettings
    model: str | None = None
    """A hub id (Qwen/Qwen2-0.5B) or a local model folder. May be left out when `parent` is set:
    the parent adapter's base is used."""
    method: Literal["lora", "qlora", "full"] = "lora"
    """lora: a LoRA adapter on the base. qlora: a LoRA adapter on a 4- or 8-bit base (see `quant`).
    full: every weight trained; the output is a complete model folder."""
    parent: str | None = None
    """An adapter folder to build on (e.g. SFT on top of a CPT adapter); it is applied, merged into
    the base in memory, and recorded in the manifest, and every command loading this adapter applies
    the parent first."""
    output: str | None = None
    """Where the adapter folder goes. Default: adapters/<recipe file name without .yaml>. `~` is your home
    folder; a symbolic link is followed (the adapter is written where it points)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the model's authors."""
    serve_with: list[str] = field(default_factory=list)
    """Engines the adapter is meant for (vllm, llama.cpp, ollama, peft): training warns at the start when the
    recipe makes an adapter one of them cannot apply (a DoRA adapter for vLLM), as `lorakit check` would say."""
    allow_untested_family: bool = False
    """Train a model of a family lorakit has not been tested on (README: Model families), once lorakit's own
    checks of its chat template pass (assistant turns found, closed by a special token). Off: refused."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    pref: PrefSettings = field(default_factory=PrefSettings)
    name: str = "recipe"
    """The recipe's name; defaults to its file name."""

    def __post_init__(self):
        if self.model is None and self.parent is None:
            raise LorakitError("the recipe needs `model` (a hub id or a local folder) or `parent`")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise LorakitError(f"name {self.name!r}: use letters, digits, '.', '_' and '-' only")
        if self.data.streaming and self.train.max_steps <= 0:
            raise LorakitError("data.streaming needs train.max_steps: a stream has no length to count epochs in")
        if self.stage not in PREFERENCE_STAGES and self.pref != PrefSettings():
            raise LorakitError(f"pref.* settings apply to the preference stages (dpo, kto, orpo, simpo), not to "
                               f"stage: {self.stage}")
        if self.stage in PREFERENCE_STAGES:
            if self.data.field:
                raise LorakitError(f"data.field: a {self.stage} record's fields are read by name (prompt, chosen, "
                                   f"rejected, completion, label); rename them in the data")
            if self.data.streaming:
                raise LorakitError(f"data.streaming: the {self.stage} stage needs its data prepared (turn streaming off)")
        if self.method == "full" and (self.lora.variants or self.train.loraplus_lr_ratio):
            switched = self.lora.variants + (["LoRA+"] if self.train.loraplus_lr_ratio else [])
            raise LorakitError(f"{', '.join(switched)}: LoRA variants apply to method lora and qlora; method: full "
                               f"trains every weight")
        unknown = [e for e in self.serve_with if e not in SERVING_ENGINES]
        if unknown:
            raise LorakitError(f"serve_with {unknown[0]!r}: expected some of {', '.join(SERVING_ENGINES)}")
        if self.output and ".." in Path(self.output).parts:
            raise LorakitError(f"output {self.output!r} must not climb out of its folder with '..'")

    @property
    def output_dir(self) -> Path:
        return output_path(self.output) if self.output else Path("adapters") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def output_path(path: str | Path) -> Path:
    """The folder a user's output setting names: `~` expanded; a symbolic link is followed, so the
    link keeps pointing at the new output instead of being replaced by a folder."""
    out = Path(path).expanduser()
    return Path(os.path.realpath(out)) if out.is_symlink() else out
