"""The manifest: what an output folder holds, what made it, and how to load it.

One dataclass that reads and writes itself (as peft's PeftConfig does), built here and read wherever a
manifest is read. `schema` counts format changes: manifests written before it existed (lorakit 0.1.0,
schema 0) still load, and keys this version does not know are kept, not dropped, when a manifest is
read and written again.

    kind "adapter"      a LoRA adapter (train, method lora or qlora)
         "model"        a complete model (train, method full)
         "merged"       adapters folded into their base (merge, export)
         "combination"  a weighted combination of adapters (merge --weights)
         "gguf"         a merged model as a GGUF file, with an Ollama Modelfile (export --format gguf)
         "gguf-adapter" an adapter (chain) as llama.cpp's LoRA GGUF, with a Modelfile
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LorakitError, first_line

MANIFEST = "manifest.json"
SCHEMA = 1


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class Quantization:
    """The quantized base a QLoRA adapter was trained on, so that inference and merging load the same."""

    bits: int
    """4 (QLoRA) or 8 (LLM.int8())."""
    type: str
    """nf4 or fp4 for 4 bits; int8 for 8."""
    double_quant: bool
    """The 4-bit scales quantized too."""
    compute_dtype: str
    """The dtype the dequantized weights are multiplied in: float32, bfloat16 or float16."""
    storage: str = "uint8"
    """How 4-bit weights are stored: uint8, or the compute dtype when FSDP shards them."""

    def to_dict(self) -> dict:
        """As manifests have always recorded it: `storage` only where it is not the default."""
        value = dataclasses.asdict(self)
        if value["storage"] == "uint8":
            del value["storage"]
        return value

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit base"
        return f"4-bit {self.type} base{', double-quantized' if self.double_quant else ''}"

    @classmethod
    def from_dict(cls, value: dict | None) -> Quantization | None:
        if not value:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})


@dataclass(frozen=True)
class Parent:
    """The adapter an adapter was trained on top of; its copy travels inside the folder."""

    path: str
    name: str | None = None
    stage: str | None = None
    copied_to: str = "parent/"


@dataclass
class Manifest:
    kind: str
    """adapter, model, merged or combination (module docstring)."""
    method: str | None = None
    """lora, qlora or full for a trained folder; merged or combination otherwise."""
    stage: str | None = None
    """cpt or sft: what the weights were last trained for (decides chat or text at inference)."""
    base_model: str | None = None
    """The hub id or folder the weights build on."""
    base_model_path: str | None = None
    """That folder's absolute path, when it was a local one."""
    base_fingerprint: str | None = None
    """A hash of the base's config and vocabulary: adapters refuse a base with another (weights.loading)."""
    system_prompt: str | None = None
    """The system prompt conversations without one were trained with; inference uses the same."""
    reasoning: str | None = None
    """SFT with a template that writes a reasoning block: data.reasoning (keep, empty, none); inference
    renders prompts the same way."""
    parent: Parent | None = None
    quantization: Quantization | None = None
    name: str | None = None
    recipe: str | None = None
    """The recipe's name; the resolved recipe itself is recipe.yaml beside the manifest."""
    data: dict | None = None
    """Training data: path, hash, examples, rows, tokens, trained tokens, eval rows."""
    lora: dict | None = None
    """r, alpha, target."""
    metrics: dict = field(default_factory=dict)
    """First and final loss, steps, tokens, tokens/s, runtime; eval loss and perplexity."""
    trained_on: dict | None = None
    """device and dtype of training."""
    dtype: str | None = None
    """The dtype of the written weights (models and exports)."""
    reload_check: dict | None = None
    """Largest logit difference between the trained model and what was written, reloaded."""
    verify: dict | None = None
    """Exports: largest logit difference between the written model and the adapter on its base."""
    run_id: str | None = None
    """The training run that wrote it: a run folder with the same id is that finished run's leftover."""
    sources: list[str] | None = None
    """Exports: the adapters (or model) merged."""
    onto: str | None = None
    """Exports of QLoRA adapters: merged onto the trained (dequantized) or the original weights."""
    drift_from_trained: float | None = None
    """Exports --onto original: how far that is from the quantized model as trained."""
    chat: bool | None = None
    """Exports: stops at the end-of-turn token."""
    full_model_source: bool | None = None
    size_bytes: int | None = None
    combination: dict | None = None
    """Combinations: type, adapters, weights, and the distance from the exact weighted sum."""
    versions: dict = field(default_factory=dict)
    """lorakit, torch, transformers, peft, python."""
    created: str = field(default_factory=now)
    lorakit_version: str = __version__
    schema: int = SCHEMA
    files: list[str] = field(default_factory=list)
    """Every entry of the folder, written last: how a later write proves the folder is lorakit's."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of a newer (or older) lorakit that this version does not know: kept as they were."""

    @classmethod
    def from_dict(cls, value: dict) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        fields = {k: v for k, v in value.items() if k in known}
        if "kind" not in fields:  # schema 0 had none
            fields["kind"] = {"full": "model", "merged": "merged", "combination": "combination"}.get(
                value.get("method"), "adapter")
        parent = fields.get("parent")
        fields["parent"] = Parent(**{k: v for k, v in parent.items() if k in Parent.__dataclass_fields__}) \
            if isinstance(parent, dict) and parent.get("path") else None
        fields["quantization"] = Quantization.from_dict(fields.get("quantization"))
        fields.setdefault("schema", 0)
        return cls(**fields, extra={k: v for k, v in value.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        value = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.parent is not None:
            value["parent"] = dataclasses.asdict(self.parent)
        if self.quantization is not None:
            value["quantization"] = self.quantization.to_dict()
        return {**value, **self.extra}

    @classmethod
    def read(cls, folder: str | Path) -> Manifest | None:
        """The folder's manifest; None where there is none (a plain peft adapter); a damaged one is an
        error naming the file."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        value = read_json_object(path, "lorakit manifest")
        if not isinstance(value.get("lorakit_version"), str):
            raise LorakitError(f"{path}: not a lorakit manifest (no lorakit_version)")
        schema = value.get("schema", 0)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 0:
            raise LorakitError(f"{path}: `schema` must be a whole number, got {schema!r}")
        if schema > SCHEMA:
            raise LorakitError(f"{path}: written by a newer lorakit (manifest schema {schema}, "
                               f"{value['lorakit_version']}); this lorakit reads schema {SCHEMA} and older: upgrade it")
        _check_quantization(value.get("quantization"), path)
        return cls.from_dict(value)

    def write(self, folder: Path) -> None:
        """Written last: lists every entry of the folder."""
        self.files = sorted({p.name for p in folder.iterdir()} | {MANIFEST})
        (folder / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")

    def describe(self) -> str:
        """"an adapter (written 2026-11-29 20:57, final loss 0.1234)", for messages about what is there."""
        what = {"merged": "a merged model", "model": "a fully fine-tuned model", "combination": "a combined adapter",
                "gguf": "a GGUF model", "gguf-adapter": "a GGUF adapter"}.get(self.kind, "an adapter")
        facts = [f"written {self.created[:16].replace('T', ' ')}" if self.created else ""]
        loss = self.metrics.get("final_loss")
        facts.append(f"final loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
        facts = [f for f in facts if f]
        return f"{what} ({', '.join(facts)})" if facts else what


def _check_quantization(value: Any, path: Path) -> None:
    """A manifest's `quantization` decides how the base is loaded: anything but what lorakit writes is named."""
    if value is None:
        return
    expected = "an object like {\"bits\": 4, \"type\": \"nf4\", \"double_quant\": true, \"compute_dtype\": \"bfloat16\"}"
    if not isinstance(value, dict):
        raise LorakitError(f"{path}: `quantization` must be {expected}, got {value!r}")
    if value.get("bits") not in (4, 8) or not isinstance(value.get("type"), str) or \
            not isinstance(value.get("double_quant"), bool) or \
            value.get("compute_dtype") not in ("float32", "bfloat16", "float16"):
        raise LorakitError(f"{path}: `quantization` must be {expected}, got {json.dumps(value)[:200]}")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, or one line naming the file and what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LorakitError(f"{path}: not a valid {what} ({first_line(exc)})") from None
    except OSError as exc:
        raise LorakitError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path}: not a valid {what} (a JSON object was expected, found {type(value).__name__})")
    return value


