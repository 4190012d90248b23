"""The adapter folder: written whole or not at all, self-describing, and loadable with plain peft.

    adapters/<name>/
      adapter_config.json, adapter_model.safetensors   peft's own files
      tokenizer files + chat template                  what the adapter was trained with
      recipe.yaml                                      the resolved recipe, every default spelled out
      manifest.json                                    base id + fingerprint, stage, parent, data hash,
                                                       system prompt, metrics, versions
      metrics.jsonl, loss.png                          the training curve
      parent/                                          a copy of the parent adapter, if any, so the
                                                       folder stays usable when the parent moves
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..errors import LorakitError, first_line
from ..log import say
from ..recipe import Recipe
from .manifest import Manifest, Quantization, read_json_object

SHARD_SIZE = "2GB"
MAX_CHAIN = 32  # stages stacked on one base: far above any real chain, far below a loop


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's lorakit manifest, or None for a plain peft adapter; a damaged one is an error."""
    return Manifest.read(folder)


def is_full_model(folder: str | Path) -> bool:
    """A complete model folder (a full fine-tune, an export) rather than an adapter."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def check_adapter_folder(folder: str | Path, what: str = "adapter") -> Path:
    """An adapter folder whose files can be read: a JSON-object adapter_config.json and a complete
    safetensors file. A truncated or damaged adapter is named here, in one line, before peft reads it."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.exists():
        raise LorakitError(f"{folder}: {what} folder not found (looked at {folder.resolve()})")
    if not (folder / "adapter_config.json").is_file():
        raise LorakitError(f"{folder}: not an adapter folder (no adapter_config.json)")
    config = read_json_object(folder / "adapter_config.json", "adapter config")
    if "r" not in config or "target_modules" not in config:
        raise LorakitError(f"{folder / 'adapter_config.json'}: not a LoRA adapter config (no `r` or `target_modules`)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise LorakitError(f"{folder}: the adapter has no adapter_model.safetensors")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise LorakitError(f"{weights}: damaged or incomplete weights ({first_line(exc)})") from None
    return folder


def record_base(folder: Path) -> None:
    """peft writes the base as it was named (`models/base`, relative to where lorakit ran), so that
    AutoPeftModelForCausalLM failed from any other folder: a local base is recorded as its absolute path."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base and Path(base).expanduser().is_dir():
        config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_adapter(staging: Path, out: Path, model, tokenizer, recipe: Recipe, manifest: Manifest,
                  save_options: dict | None = None) -> None:
    """Write peft weights (or a full model), tokenizer, resolved recipe, (if any) the parent copy, and the
    manifest, which the reload check reads; it is written again last, complete. `save_options`: peft's, for
    an adapter converted as it is written (variants.save_options)."""
    model.save_pretrained(staging, max_shard_size=SHARD_SIZE, **(save_options or {}))
    record_base(staging)
    tokenizer.save_pretrained(staging)
    (staging / "recipe.yaml").write_text(
        f"# lorakit train {out / 'recipe.yaml'}   (the resolved recipe of {recipe.name}: every default spelled out)\n"
        + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    if recipe.parent and not is_full_model(recipe.parent):
        shutil.copytree(recipe.parent, staging / "parent")
    manifest.write(staging)




def adapter_chain(folder: str | Path) -> list[Path]:
    """The adapters to apply, base-most first: parent copies, then the adapter itself (none for a
    full model folder, which is its own base). Every one is checked to be readable."""
    if is_full_model(folder):
        return []
    chain = [check_adapter_folder(folder)]
    manifest = read_manifest(folder)
    if manifest and manifest.parent and not (chain[0] / "parent").is_dir():
        raise LorakitError(f"{folder}: its manifest names a parent adapter, but the copy in {chain[0] / 'parent'} "
                           f"is missing; the adapter cannot be applied without it")
    seen = {chain[0].resolve()}
    while (chain[0] / "parent").is_dir():
        parent = chain[0] / "parent"
        if parent.resolve() in seen or len(chain) >= MAX_CHAIN:
            raise LorakitError(f"{parent}: the chain of parents loops back on itself (it leads to "
                               f"{parent.resolve()} again); a parent must be a copy of another adapter")
        seen.add(parent.resolve())
        chain.insert(0, check_adapter_folder(parent, "parent copy"))
    return chain


def base_of(folder: str | Path) -> str:
    """The base model an adapter was trained on, as its manifest or peft config records it (a full
    model folder is its own base)."""
    if not Path(folder).exists():
        raise LorakitError(f"{folder}: adapter folder not found (looked at {Path(folder).resolve()})")
    if is_full_model(folder):
        return str(folder)
    manifest = read_manifest(folder)
    if manifest:
        path = manifest.base_model_path
        if isinstance(path, str) and Path(path).exists():
            return path
        if not isinstance(manifest.base_model, str):
            raise LorakitError(f"{Path(folder) / 'manifest.json'}: names no `base_model`; pass --model")
        return manifest.base_model
    config = read_json_object(check_adapter_folder(folder) / "adapter_config.json", "adapter config")
    if not isinstance(config.get("base_model_name_or_path"), str) or not config["base_model_name_or_path"]:
        raise LorakitError(f"{folder}: the adapter does not say its base model; pass --model")
    return config["base_model_name_or_path"]


def inputs_of(sources, model: str | None = None) -> list[tuple[str, str | Path | None]]:
    """What a command that reads `sources` (adapters or model folders) reads, for check_output: each source
    and the base each adapter names (a local model folder above all: `export ADAPTER -o BASE --overwrite`
    once replaced the run's own base). Parents travel inside their child's folder, so the child covers them."""
    found: list[tuple[str, str | Path | None]] = [(f"the source {s}", s) for s in sources] + [("the model", model)]
    for source in sources:
        if Path(source).is_dir() and not is_full_model(source):
            try:
                found.append((f"the base model of {source}", base_of(source)))
            except LorakitError:
                pass  # an adapter that names no base: nothing of it to protect
    return found


def weights_digest(folder: Path) -> str:
    """Identifies an adapter by its weights, wherever it was copied (a parent inside its child)."""
    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()


def trained_quantization(manifests) -> Quantization | None:
    """The quantized base the adapters were trained on (from their manifests), or None."""
    return next((m.quantization for m in manifests if m and m.quantization), None)


def expand_chain(adapters: list[str | Path]) -> list[Path]:
    """The adapters to apply, base-most first, each given adapter's parent copies included once.

    `--adapter cpt --adapter sft` and `--adapter sft` name the same chain when sft was trained on cpt:
    an adapter whose weights already appear earlier (as a parent copy) is not applied twice.
    """
    chain, seen = [], set()
    for adapter in adapters:
        for folder in adapter_chain(adapter):
            digest = weights_digest(folder)
            if digest not in seen:
                seen.add(digest)
                chain.append(folder)
    return chain


def check_base(adapter: str | Path, manifest: Manifest | None, base_fingerprint: str, name: str, force: bool) -> None:
    """Stop when an adapter is applied to a base other than the one it was trained on (`base_fingerprint`:
    loading.fingerprint of the loaded base)."""
    if not manifest or not manifest.base_fingerprint:
        say(f"warning: {adapter} has no lorakit manifest (a plain peft adapter?): its base could not be checked")
    elif manifest.base_fingerprint != base_fingerprint and not force:
        raise LorakitError(f"{adapter} was trained on {manifest.base_model} (fingerprint "
                           f"{manifest.base_fingerprint}), and {name} is a different model (fingerprint "
                           f"{base_fingerprint}); use --force to apply it anyway")


class Loaded(NamedTuple):
    model: Any
    tokenizer: Any
    manifest: Manifest | None
    """The manifest of the last adapter applied (None for a bare model or a plain peft adapter)."""


def split_full_model(model: str | None, adapters: list) -> tuple[str | None, list]:
    """A complete model folder (a full fine-tune, an export) given where adapters go is the model itself:
    (model, remaining adapters). Alongside other adapters, or with --model, it is an error."""
    full = [a for a in adapters if is_full_model(a)]
    if not full:
        return model, adapters
    if len(adapters) > 1 or model is not None:
        raise LorakitError(f"{full[0]} is a complete model, not an adapter: pass it as --model")
    return str(full[0]), []


def load_for_inference(model: str | None, adapters, device: str, dtype, *, force: bool = False,
                       quantized: bool = True, merge: bool = False) -> Loaded:
    """Base model (from --model, or the first adapter's manifest) with the adapter chain applied.

    `adapters` is a folder or a list of folders (a chain; parents are applied first and merged; the
    last stays a peft adapter unless `merge`). A full model folder stands for the model itself. A QLoRA
    adapter is applied to the same quantized base it was trained against unless `quantized` is False
    (the original weights); with `merge` that base is dequantized first, so the sum is never
    re-quantized. Refuses a base whose fingerprint differs from the one an adapter was trained on,
    unless `force`.
    """
    from .loading import fingerprint, load_model, load_tokenizer

    adapters = [adapters] if isinstance(adapters, (str, Path)) else list(adapters or [])
    if model is None and not adapters:
        raise LorakitError("name a model (--model) or an adapter (--adapter)")
    model, adapters = split_full_model(model, adapters)
    manifests = [read_manifest(a) for a in adapters]
    name = model or base_of(adapters[0])
    for adapter in adapters:
        adapter_chain(adapter)  # every file readable, before minutes go into loading the base
    quantization = trained_quantization(manifests) if quantized and adapters else None
    tokenizer = load_tokenizer(name)
    lm = load_model(name, dtype, device, quantization=quantization)
    if merge and quantization:
        lm = lm.dequantize(dtype=dtype)
    if adapters:
        lm = apply_chain(lm, adapters, fingerprint(lm.config, tokenizer), name, force=force, merge=merge,
                         manifests=manifests)
    return Loaded(lm.eval(), tokenizer, manifests[-1] if manifests else None)


def apply_adapter(model, folder: str | Path, merge: bool, name: str = "default"):
    """Apply a saved LoRA adapter; `merge` folds it into the weights (for a parent under a child). On a
    model that is already a peft model, the adapter is loaded beside the others under `name`."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in lines if line.strip().startswith("size mismatch")), lines[0])
        raise LorakitError(f"{folder} does not fit this model: its weight shapes differ ({first[:300]})") from None
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:  # a config peft cannot use
        raise LorakitError(f"{folder}: peft cannot load this adapter ({first_line(exc)})") from exc
    return model.merge_and_unload() if merge else model


def apply_chain(lm, adapters: list, base_fingerprint: str, name: str, *, force: bool = False, merge: bool = False,
                manifests: list | None = None):
    """Check that each adapter was trained on this base, then apply the chain base-most first: parents
    merged into the weights, the last kept as a peft adapter unless `merge`."""
    manifests = manifests if manifests is not None else [read_manifest(a) for a in adapters]
    for adapter, manifest in zip(adapters, manifests):
        check_base(adapter, manifest, base_fingerprint, name, force)
    chain = expand_chain(adapters)
    for index, folder in enumerate(chain):
        lm = apply_adapter(lm, folder, merge=merge or index < len(chain) - 1)
    return lm
