"""Merged, deployable model folders that are checked before they are kept.

OUT holds sharded safetensors (with an index when there is more than one shard), config, tokenizer
and chat template, and a generation config whose EOS matches how the model was trained. After
writing, OUT is reloaded with plain transformers and its logits compared with the adapter applied to
its base; beyond the dtype's tolerance OUT is removed and the command fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import __version__
from .adapters import SHARD_SIZE, is_full_model, load_for_inference, read_manifest, trained_quantization, write_manifest
from .merge import merged_model
from .modeling import DTYPES, release_memory, set_stop_tokens
from .log import say
from .outputs import check_output, output_path, publish, staging
from .runs import check_disk
from .verify import compare, logits, text_probe

def export(sources: list[str], out: Path, *, model: str | None = None, dtype: str = "bf16",
           shard_size: str = SHARD_SIZE, onto: str = "trained", verify: bool = True, force: bool = False,
           device: str = "cpu", overwrite: bool = False) -> dict:
    """Merge `sources` (an adapter, a chain, or one model folder) into a model folder at `out`."""
    out = output_path(out)
    check_output(out, overwrite=overwrite, inputs=[(f"the source {s}", s) for s in sources] + [("the model", model)])
    target = DTYPES[dtype]
    manifests = [read_manifest(s) or {} for s in sources]
    reference, report = _reference(sources, manifests, model, onto, force, device) if verify else (None, {})
    merged, tokenizer = merged_model(sources, device, torch.float32, onto=onto, model=model, force=force)
    size = sum(p.numel() for p in merged.parameters()) * torch.finfo(target).bits // 8
    check_disk(out.parent, int(1.1 * size), f"the {dtype} export")
    # chat-tuned anywhere in the chain, or a chat model to begin with
    chat = "sft" in [m.get("stage") for m in manifests] or tokenizer.eos_token == "<|im_end|>"
    with staging(out) as folder:
        set_stop_tokens(merged, tokenizer, chat)
        merged.to(target).save_pretrained(folder, max_shard_size=shard_size)
        tokenizer.save_pretrained(folder)
        del merged
        release_memory()
        if verify:
            report["verify"] = _verify(folder, out, reference, _coarsest(target, manifests, onto))
        report.update(_facts(sources, manifests, folder, dtype, onto, chat))
        write_manifest(folder, report)
        return {**report, "path": str(publish(folder, out, overwrite=overwrite))}


def _reference(sources, manifests, model, onto, force, device) -> tuple[tuple, dict]:
    """Logits of the adapter applied to its base (unmerged, fp32): what OUT must reproduce. With
    --onto original, also how far that drifts from the model the adapter was trained as."""
    lm, tokenizer, _ = load_for_inference(model, sources, device, torch.float32, force, quantized=onto == "trained")
    probe = text_probe(tokenizer)
    expected = logits(lm, probe)
    report = {}
    if onto == "original" and trained_quantization(manifests):
        del lm
        trained, _, _ = load_for_inference(model, sources, device, torch.float32, force)
        drift = (logits(trained, probe) - expected).abs().max().item()
        report["drift_from_trained"] = drift
        say(f"--onto original: the merged model's logits differ from the quantized model it was trained "
            f"as by up to {drift:.3g}")
    return (probe, expected), report


def _coarsest(target: torch.dtype, manifests, onto: str) -> torch.dtype:
    """The precision the comparison can hold to: the export's, or that of the quantized model's
    compute when the reference is a QLoRA model trained in half precision."""
    compute = (trained_quantization(manifests) or {}).get("compute_dtype")
    if onto != "trained" or compute in (None, "float32"):
        return target
    return target if target != torch.float32 else getattr(torch, compute)


def _verify(staging: Path, out: Path, reference, precision: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    probe, expected = reference
    reloaded = AutoModelForCausalLM.from_pretrained(staging)
    result = compare(expected, logits(reloaded, probe), precision, f"verifying {out}")
    say(f"verified: {out} reloaded with plain transformers matches the adapter on its base "
        f"(max logit difference {result['max_logit_diff']:.3g}, limit {result['tolerance']:.3g})")
    return result


def _facts(sources, manifests, staging: Path, dtype: str, onto: str, chat: bool) -> dict:
    size = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
    say(f"exported {len(list(staging.glob('*.safetensors')))} safetensors shard(s), {size / 2**20:.1f} MiB, "
        f"dtype {dtype}; stops at {'<|im_end|>' if chat else 'the base EOS'}")
    return {"lorakit_version": __version__, "kind": "merged", "method": "merged", "dtype": dtype,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sources": [str(Path(s).resolve()) for s in sources], "onto": onto, "chat": chat,
            "stage": next((m.get("stage") for m in reversed(manifests) if m.get("stage")), None),
            "system_prompt": next((m["system_prompt"] for m in reversed(manifests) if m.get("system_prompt")), None),
            "base_model": next((m.get("base_model") for m in manifests if m.get("base_model")), None),
            "base_fingerprint": next((m.get("base_fingerprint") for m in manifests if m.get("base_fingerprint")), None),
            "full_model_source": any(is_full_model(s) for s in sources), "size_bytes": size}
