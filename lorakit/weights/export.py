"""Merged, deployable model folders that are checked before they are kept.

OUT holds sharded safetensors (with an index when there is more than one shard), config, tokenizer
and chat template, and a generation config whose EOS matches how the model was trained. After
writing, OUT is reloaded with plain transformers and its logits compared with the adapter applied to
its base; beyond the dtype's tolerance OUT is removed and the command fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.template import is_chat_model, style_for, with_default_kwargs
from ..log import say
from ..stages import stage as stage_of
from .folders import (
    SHARD_SIZE,
    adapter_chain,
    inputs_of,
    is_full_model,
    load_for_inference,
    read_manifest,
    trained_quantization,
)
from .loading import DTYPES, release_memory, set_stop_tokens
from .manifest import Manifest, Quantization
from .outputs import check_disk, check_output, output_path, publish, staging
from .variants import GGUF_ADAPTER, refuse
from .verify import logits, require_same_logits, text_probe


@dataclass(frozen=True)
class ExportSettings:
    """How `lorakit export` and `lorakit merge` write a model (their options, one for one)."""

    model: str | None = None
    """The base (default: the one in the adapter's manifest)."""
    dtype: str = "bf16"
    """bf16, fp16 or fp32: the written weights."""
    shard_size: str = SHARD_SIZE
    onto: str = "trained"
    """QLoRA: merge onto the dequantized weights it trained on ("trained") or the original ones."""
    verify: bool = True
    """Reload the written folder and compare its logits with the adapter on its base."""
    force: bool = False
    """Apply adapters to a base they were not trained on."""
    overwrite: bool = False
    """Replace what lorakit wrote earlier at the output."""
    device: str = "cpu"


def export(sources: list[str], out: Path, settings: ExportSettings = ExportSettings(), *,
           step_of: Path | None = None) -> Path:
    """Merge `sources` (an adapter, a chain, or one model folder) into a model folder at `out`; returns
    the folder written. `step_of`: this merge is a step of writing that output (a GGUF), so the messages
    name it, not this temporary folder."""
    model, dtype, onto, force, device = settings.model, settings.dtype, settings.onto, settings.force, settings.device
    out = output_path(out)
    check_output(out, overwrite=settings.overwrite, inputs=inputs_of(sources, model))
    target = DTYPES[dtype]
    manifests = [read_manifest(s) for s in sources]
    manifest = _manifest(sources, [m for m in manifests if m], dtype, onto)
    trained_on = trained_quantization(manifests)  # the merged weights themselves are never quantized
    reference = _reference(sources, manifest, trained_on, settings) if settings.verify else None
    merged, tokenizer = merged_model(sources, device, torch.float32, onto=onto, model=model, force=force)
    size = sum(p.numel() for p in merged.parameters()) * torch.finfo(target).bits // 8
    check_disk(out.parent, int(1.1 * size), f"the {dtype} export")
    # chat-tuned anywhere in the chain, or a chat model to begin with
    manifest.chat = chat = any(stage_of(m.stage).chat for m in manifests if m) or is_chat_model(tokenizer)
    with staging(out, shown=step_of) as folder:
        end = set_stop_tokens(merged, tokenizer, chat)
        with_default_kwargs(tokenizer, style_for(tokenizer, manifest.reasoning or "keep"))
        merged.to(target).save_pretrained(folder, max_shard_size=settings.shard_size)
        tokenizer.save_pretrained(folder)
        del merged
        release_memory()
        if settings.verify:
            manifest.verify = _verify(folder, step_of or out, reference, _coarsest(target, trained_on, onto))
        manifest.size_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if step_of is None:
            say(f"exported {len(list(folder.glob('*.safetensors')))} safetensors shard(s), "
                f"{manifest.size_bytes / 2**20:.1f} MiB, dtype {dtype}; stops at {end or tokenizer.eos_token}"
                + ("" if end else " (EOS: a text model)"))
        manifest.write(folder)
        return publish(folder, out, overwrite=settings.overwrite)


def merged_model(adapters, device: str, dtype, onto: str = "trained", model: str | None = None,
                 force: bool = False):
    """The base with the adapter chain merged in, as a plain transformers model (and its tokenizer).

    A QLoRA adapter was trained against the dequantized 4/8-bit weights, so by default it is merged
    onto exactly those (`onto="trained"`): dequantized in `dtype`, then merged. Merging straight into
    the quantized model would re-quantize the sum (logits move by about 0.05); `onto="original"`
    merges onto the unquantized base weights instead.
    """
    lm, tokenizer, _ = load_for_inference(model, adapters, device, dtype, force=force, quantized=onto == "trained",
                                          merge=True)
    return lm, tokenizer


def _reference(sources, manifest: Manifest, trained_on: Quantization | None, settings: ExportSettings) -> tuple:
    """Logits of the adapter applied to its base (unmerged, fp32): what OUT must reproduce. With
    --onto original, also how far that drifts from the model the adapter was trained as (recorded)."""
    model, force, device = settings.model, settings.force, settings.device
    lm, tokenizer, _ = load_for_inference(model, sources, device, torch.float32, force=force,
                                          quantized=settings.onto == "trained")
    probe = text_probe(tokenizer)
    expected = logits(lm, probe)
    if settings.onto == "original" and trained_on:
        del lm
        trained = load_for_inference(model, sources, device, torch.float32, force=force).model
        manifest.drift_from_trained = drift = (logits(trained, probe) - expected).abs().max().item()
        say(f"--onto original: the merged model's logits differ from the quantized model it was trained "
            f"as by up to {drift:.3g}")
    return probe, expected


def _coarsest(target: torch.dtype, trained_on: Quantization | None, onto: str) -> torch.dtype:
    """The precision the comparison can hold to: the export's, or that of the quantized model's
    compute when the reference is a QLoRA model trained in half precision."""
    compute = trained_on.compute_dtype if trained_on else None
    if onto != "trained" or compute in (None, "float32"):
        return target
    return target if target != torch.float32 else getattr(torch, compute)


def _verify(staging: Path, out: Path, reference, precision: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    probe, expected = reference
    reloaded = AutoModelForCausalLM.from_pretrained(staging)
    result = require_same_logits(expected, logits(reloaded, probe), precision, f"verifying {out}")
    say(f"verified: the merged weights of {out} reloaded with plain transformers match the adapter on its base "
        f"(max logit difference {result['max_logit_diff']:.3g}, limit {result['tolerance']:.3g})")
    return result


def _manifest(sources, manifests: list[Manifest], dtype: str, onto: str) -> Manifest:
    """What the export records: its sources, and what it inherits from them (the last stage and system
    prompt of the chain, the base and its fingerprint, the quantization trained on)."""
    last = lambda name: next((getattr(m, name) for m in reversed(manifests) if getattr(m, name)), None)
    return Manifest(kind="merged", method="merged", dtype=dtype, onto=onto,
                    sources=[str(Path(s).resolve()) for s in sources], stage=last("stage"),
                    system_prompt=last("system_prompt"), reasoning=last("reasoning"), base_model=last("base_model"),
                    base_fingerprint=last("base_fingerprint"), full_model_source=any(is_full_model(s) for s in sources))


def export_gguf(sources: list[str], out: Path, settings: ExportSettings, quant: str) -> Path:
    """`--format gguf`: the sources merged and verified as a model folder would be, then written as one
    GGUF file (read back and compared tensor by tensor) with an Ollama Modelfile beside it."""
    import dataclasses
    import json
    import tempfile

    from .gguf import announce, check_file, check_quant, write_model

    check_quant(quant)
    out = output_path(out)
    check_output(out, overwrite=settings.overwrite, inputs=inputs_of(sources, settings.model))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merging-") as work:
        merged = export(sources, Path(work) / "merged", dataclasses.replace(settings, dtype="fp32", overwrite=True),
                        step_of=out)
        recorded = read_manifest(merged)
        chat = bool(recorded.chat)
        with staging(out) as folder:
            facts = write_model(merged, folder / "model.gguf", quant, chat, name=out.name)
            worst = check_file(folder / "model.gguf", facts.pop("sources"), quant)
            announce(out / "model.gguf", facts)
            config = json.loads((merged / "config.json").read_text())
            (folder / "Modelfile").write_text(_modelfile("./model.gguf", None, recorded, chat, merged, config),
                                              encoding="utf-8")
            Manifest(kind="gguf", method="merged", stage=recorded.stage, base_model=recorded.base_model,
                     base_fingerprint=recorded.base_fingerprint, system_prompt=recorded.system_prompt, reasoning=recorded.reasoning,
                     chat=recorded.chat, dtype=quant, sources=recorded.sources, verify=recorded.verify,
                     size_bytes=facts["size_bytes"], extra={"gguf_check": {"max_relative_diff": worst}}).write(folder)
            return publish(folder, out, overwrite=settings.overwrite)


def _from_modelfile(out: Path, base_gguf: str | None) -> str:
    """The base GGUF as the Modelfile in `out` must name it: Ollama reads FROM relative to the Modelfile's
    own folder (and, not finding a file, would try to pull a model of that name)."""
    import os

    if base_gguf is None:
        return "./base.gguf"
    target = Path(base_gguf).expanduser().resolve()
    if not target.is_file():
        say(f"warning: --base-gguf {base_gguf}: no such file yet ({target}); the Modelfile names it there")
    relative = os.path.relpath(target, out.resolve())
    return relative if relative.startswith("..") else f"./{relative}"


def _modelfile(where: str, adapter: str | None, recorded: Manifest, chat: bool, tokenizer_from: str | Path,
               config: dict) -> str:
    """The Ollama Modelfile of an export: the family's template (ending in the empty reasoning block when the
    adapter was trained with thinking off), the system prompt Ollama must send (the one recorded at training,
    else the one the model's own template inserts, which Ollama's template would not), and the stops (the
    end of turn, the tokenizer's EOS and any other the generation config stops at)."""
    import json

    from ..data.template import end_of_turn, style_for, template_system_prompt
    from ..families import family_of
    from .gguf import modelfile
    from .loading import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_from))
    style = style_for(tokenizer, recorded.reasoning or "keep")
    generation = Path(tokenizer_from) / "generation_config.json"
    ids = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    stops = ([end_of_turn(tokenizer, style)] if chat else []) + [tokenizer.eos_token] + [
        tokenizer.convert_ids_to_tokens(i) for i in ([ids] if isinstance(ids, int) else ids or [])]
    system = None
    if chat:
        system = recorded.system_prompt if recorded.system_prompt is not None else template_system_prompt(tokenizer)
    no_thinking = style.block.empty if style.block and style.kwargs() else ""
    return modelfile(where, adapter, system, chat, family_of(config), stops, no_thinking, tokenizer.chat_template)


def export_gguf_adapter(source: str, out: Path, settings: ExportSettings, base_gguf: str | None = None) -> Path:
    """`--format gguf-adapter`: the adapter chain flattened into one adapter (verified against the chain),
    then written as llama.cpp's LoRA GGUF with an Ollama Modelfile (FROM the base GGUF, ADAPTER this)."""
    import tempfile

    from .flatten import export_flat_adapter
    from .folders import base_of
    from .gguf import announce, check_file, write_adapter
    from .loading import load_config

    out = output_path(out)
    check_output(out, overwrite=settings.overwrite, inputs=inputs_of([source], settings.model))
    refuse(adapter_chain(source), GGUF_ADAPTER)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = settings.model or base_of(source)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.flattening-") as work:
        flat = export_flat_adapter(source, Path(work) / "flat", model_name=settings.model, overwrite=True,
                                   force=settings.force, device=settings.device)
        recorded = read_manifest(flat)
        with staging(out) as folder:
            config = load_config(base).to_dict()
            facts = write_adapter(flat, config, folder / "adapter.gguf")
            check_file(folder / "adapter.gguf", facts.pop("sources"), "f32")
            announce(out / "adapter.gguf", facts)
            chat = stage_of(recorded.stage).chat
            where = _from_modelfile(out, base_gguf)
            (folder / "Modelfile").write_text(_modelfile(where, "./adapter.gguf", recorded, chat, base, config),
                                              encoding="utf-8")
            if base_gguf is None:
                say(f"the Modelfile takes the base from {out / 'base.gguf'}: put the base model's GGUF there "
                    f"(lorakit export {base} --format gguf -o DIR), or pass --base-gguf")
            Manifest(kind="gguf-adapter", method="lora", stage=recorded.stage, base_model=recorded.base_model,
                     base_fingerprint=recorded.base_fingerprint, system_prompt=recorded.system_prompt, reasoning=recorded.reasoning,
                     sources=recorded.sources, verify=recorded.verify, lora=recorded.lora,
                     size_bytes=facts["size_bytes"], drift_from_trained=recorded.drift_from_trained).write(folder)
            return publish(folder, out, overwrite=settings.overwrite)
