"""Reading a recipe: YAML (a key given twice is an error), `a.b=c` overrides from the command line, and
every key and type checked against the dataclasses in settings.py. An unknown key names the closest
valid one, or lorakit's name for what the Trainer, LLaMA-Factory or axolotl call it."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import LorakitError, first_line
from .settings import (
    DataSettings,
    LoraSettings,
    PrefSettings,
    QuantSettings,
    Recipe,
    TrainSettings,
)

SECTIONS = {"data": DataSettings, "lora": LoraSettings, "quant": QuantSettings, "train": TrainSettings,
            "pref": PrefSettings}


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `a.b=c` overrides, and check every key and type."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"{path}: a recipe is a mapping of keys to values")
    raw.setdefault("name", path.stem)
    given = {}
    for item in overrides:
        given[_apply_override(raw, item)] = item
    try:
        return build(Recipe, raw, "")
    except LorakitError as exc:
        key = getattr(exc, "key", None)
        blamed = next((item for name, item in given.items()
                       if (key == name or str(key).startswith(name + ".")) or (key is None and name in str(exc))), None)
        if blamed is not None:
            raise LorakitError(f"command line {blamed}: {exc}") from None
        raise LorakitError(f"{path}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error, not a silent last-one-wins."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def _apply_override(raw: dict, item: str) -> str:
    """Set `key.sub=value` in the raw recipe; returns the key."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise LorakitError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LorakitError(f"override {item!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        raise LorakitError(f"command line {item}: the value is not valid YAML ({first_line(exc)})") from None
    return key


# What users of transformers' Trainer, LLaMA-Factory and axolotl type, and lorakit's key for it.
ALIASES = {
    "learning_rate": "train.lr", "lr": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size", "train_batch_size": "train.batch_size",
    "batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler", "lr_scheduler": "train.scheduler", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm", "seed": "train.seed",
    "max_steps": "train.max_steps", "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
    "eval_steps": "train.eval_steps", "gradient_checkpointing": "train.gradient_checkpointing",
    "bf16": "train.dtype", "fp16": "train.dtype", "torch_dtype": "train.dtype", "report_to": "train.report_to",
    "save_total_limit": "train.keep_checkpoints", "lora_r": "lora.r", "lora_rank": "lora.r", "r": "lora.r",
    "rank": "lora.r", "lora_alpha": "lora.alpha", "alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.target", "lora_target": "lora.target", "lora_target_modules": "lora.target",
    "lora_target_linear": "lora.target", "max_seq_length": "data.max_length", "max_length": "data.max_length",
    "sequence_len": "data.max_length", "cutoff_len": "data.max_length", "model_max_length": "data.max_length",
    "dataset": "data.path", "datasets": "data.path", "dataset_dir": "data.path", "train_file": "data.path",
    "data_path": "data.path", "packing": "data.packing", "sample_packing": "data.packing",
    "val_set_size": "data.eval_split", "eval_path": "data.eval_path", "system_prompt": "data.system_prompt",
    "model_name_or_path": "model", "base_model": "model", "output_dir": "output", "adapter": "method",
    "finetuning_type": "method", "load_in_4bit": "method: qlora (with quant.bits: 4)",
    "load_in_8bit": "method: qlora (with quant.bits: 8)", "adapter_name_or_path": "parent", "lora_model_dir": "parent",
    "bnb_4bit_quant_type": "quant.type", "bnb_4bit_use_double_quant": "quant.double_quant",
    "rl": "stage", "pref_beta": "pref.beta", "dpo_beta": "pref.beta", "pref_loss": "pref.loss",
    "loss_type": "pref.loss", "rl_beta": "pref.beta", "pref_ftx": "pref.sft_weight", "rpo_alpha": "pref.sft_weight",
    "cpo_alpha": "pref.sft_weight", "simpo_gamma": "pref.simpo_gamma", "precompute_ref_log_probs": "pref.reference",
    "kto_desirable_weight": "pref.desirable_weight", "kto_undesirable_weight": "pref.undesirable_weight",
    "dpo_label_smoothing": "pref.label_smoothing",
    "use_dora": "lora.use_dora", "dora": "lora.use_dora", "use_rslora": "lora.use_rslora", "rslora": "lora.use_rslora",
    "init_lora_weights": "lora.init", "pissa_init": "lora.init: pissa", "init": "lora.init",
    "loraplus_lr_ratio": "train.loraplus_lr_ratio", "trainable_token_indices": "lora.trainable_tokens",
    "additional_target": "lora.trainable_tokens (for tokens) or method: full", "modules_to_save":
    "lora.trainable_tokens (for tokens) or method: full", "lora_modules_to_save": "lora.trainable_tokens (for tokens) or method: full",
}


class RecipeKeyError(LorakitError):
    """A mistake in one key of the recipe: `key` is its full name, so a command-line override can be blamed."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _suggestion(key: str, prefix: str, names: list[str]) -> str:
    alias = ALIASES.get(str(key).lower())
    if alias is not None and alias != f"{prefix}{key}":
        return f"; lorakit calls it {alias}"
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"


def build(cls, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping, naming the full key of anything wrong."""
    if not isinstance(raw, dict):
        raise LorakitError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeKeyError(f"unknown key {prefix}{key}{_suggestion(key, prefix, names)}", f"{prefix}{key}")
        section = SECTIONS.get(key) if cls is Recipe else None
        if section is not None:
            kwargs[key] = build(section, value, f"{key}.")
        else:
            kwargs[key] = _check(value, hints[key], f"{prefix}{key}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LorakitError(f"missing key {prefix}{missing[0]}")
    return cls(**kwargs)


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` if it fits type `tp` (a float field also takes "2e-4", which YAML reads as a string)."""
    if tp is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if _fits(value, tp):
        if tp is float and not math.isfinite(value):  # YAML's .nan and .inf are floats too
            raise RecipeKeyError(f"{key} must be a finite number, got {value!r}", key)
        return float(value) if tp is float else value
    raise RecipeKeyError(f"{key} must be {_describe(tp)}, got {value!r}", key)


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(tp, tp.__name__)


