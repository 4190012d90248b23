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

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from .errors import LorakitError

MANIFEST = "manifest.json"
SHARD_SIZE = "2GB"


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's lorakit manifest, or None for a plain peft adapter."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_full_model(folder: str | Path) -> bool:
    """A complete model folder (a full fine-tune, an export) rather than an adapter."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def check_adapter_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise LorakitError(f"{folder}: not an adapter folder (no adapter_config.json)")
    return folder


def check_output(out: Path) -> None:
    """Refuse, before any training, an output path that exists and is not a lorakit adapter."""
    if out.exists() and not (out.is_dir() and (read_manifest(out) is not None or not any(out.iterdir()))):
        raise LorakitError(f"{out}: exists and is not a lorakit adapter; choose another `output` or remove it")


def staging_folder(out: Path) -> Path:
    """A fresh temporary folder beside `out` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, out: Path) -> Path:
    """Move a completed staging folder into place, replacing an older adapter of the same name."""
    check_output(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_adapter(staging: Path, out: Path, model, tokenizer, recipe, manifest: dict) -> None:
    """Write peft weights, tokenizer, resolved recipe, manifest and (if any) the parent copy."""
    model.save_pretrained(staging, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(staging)
    (staging / "recipe.yaml").write_text(
        f"# lorakit train {out / 'recipe.yaml'}   (the resolved recipe of {recipe.name}: every default spelled out)\n"
        + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    if recipe.parent and not is_full_model(recipe.parent):
        shutil.copytree(recipe.parent, staging / "parent")
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(staging, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def adapter_chain(folder: str | Path) -> list[Path]:
    """The adapters to apply, base-most first: parent copies, then the adapter itself (none for a
    full model folder, which is its own base)."""
    if is_full_model(folder):
        return []
    chain = [check_adapter_folder(folder)]
    while (chain[0] / "parent" / "adapter_config.json").is_file():
        chain.insert(0, chain[0] / "parent")
    return chain


def base_of(folder: str | Path) -> str:
    """The base model an adapter was trained on, as its manifest or peft config records it (a full
    model folder is its own base)."""
    if is_full_model(folder):
        return str(folder)
    manifest = read_manifest(folder)
    if manifest:
        path = manifest.get("base_model_path")
        return path if path and Path(path).exists() else manifest["base_model"]
    config = json.loads((check_adapter_folder(folder) / "adapter_config.json").read_text())
    if not config.get("base_model_name_or_path"):
        raise LorakitError(f"{folder}: the adapter does not say its base model; pass --model")
    return config["base_model_name_or_path"]


def load_for_inference(model: str | None, adapter: str | None, device: str, dtype, force: bool = False):
    """Base model (from --model, or the adapter's manifest) with the adapter chain applied.

    Returns (model, tokenizer, manifest-or-None). Refuses a base whose fingerprint differs from the
    one the adapter was trained on, unless `force`.
    """
    from .modeling import apply_adapter, fingerprint, load_model, load_tokenizer

    if model is None and adapter is None:
        raise LorakitError("name a model (--model) or an adapter (--adapter)")
    name = model or base_of(adapter)
    manifest = read_manifest(adapter) if adapter else None
    if adapter and is_full_model(adapter):
        name, adapter = str(adapter), None  # a full fine-tune: the folder is the model
    tokenizer = load_tokenizer(name)
    # A QLoRA adapter is applied to the same quantized base it was trained against.
    lm = load_model(name, dtype, device, quantization=manifest.get("quantization") if adapter and manifest else None)
    if adapter:
        chain = adapter_chain(adapter)
        if manifest and not force and manifest.get("base_fingerprint") != fingerprint(lm.config, tokenizer):
            raise LorakitError(f"{adapter} was trained on {manifest['base_model']}, and {name} is a different "
                               f"model (config or vocabulary differ); use --force to apply it anyway")
        for index, folder in enumerate(chain):
            lm = apply_adapter(lm, folder, merge=index < len(chain) - 1)
        lm.eval()
    return lm, tokenizer, manifest
