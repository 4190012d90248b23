"""A chain of adapters (a CPT parent and the SFT adapter trained on top of it, or longer) as ONE plain
peft LoRA adapter on the original base, which serving engines (vLLM, llama.cpp) can apply as one.

Exact, not approximate: the child was trained on W + dW_parent, so the chain's model is
W + dW_parent + dW_child, and a LoRA whose ranks are the chain's concatenated (A stacked, B side by
side, each adapter's scale (alpha/r, rsLoRA's alpha/sqrt(r)) folded into its A, alpha = r) is that sum. peft's add_weighted_adapter
with combination_type "cat" builds exactly this; lorakit only checks the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import LorakitError
from ..log import say
from .folders import (
    adapter_chain,
    apply_adapter,
    apply_chain,
    base_of,
    inputs_of,
    is_full_model,
    read_manifest,
    record_base,
    trained_quantization,
)
from .loading import fingerprint, load_model, load_tokenizer
from .manifest import Manifest
from .outputs import check_output, output_path, publish, staging
from .variants import FLATTENED, refuse, with_unit_scale
from .verify import logits, require_same_logits, text_probe

FLAT = "flat"


def flatten_into(model, chain: list[Path], name: str = FLAT):
    """Load the chain's adapters beside each other on `model` (a base, or a peft model already holding
    other adapters) and combine them into one adapter `name`; the parts are removed again. A chain of
    one is loaded as it is."""
    if len(chain) == 1:
        return apply_adapter(model, chain[0], merge=False, name=name)
    refuse(chain, FLATTENED)
    parts = [f"{name}__part{i}" for i in range(len(chain))]
    for part, folder in zip(parts, chain):
        model = apply_adapter(model, folder, merge=False, name=part)
    with_unit_scale(model, parts[0])
    model.add_weighted_adapter(parts, [1.0] * len(parts), name, combination_type="cat")
    model.set_adapter(name)
    for part in parts:
        model.delete_adapter(part)
    return model


def export_flat_adapter(source: str, out: Path, *, model_name: str | None = None, overwrite: bool = False,
                        force: bool = False, device: str = "cpu") -> Path:
    """`lorakit export ADAPTER --format adapter -o OUT`: the chain as one adapter, verified against the
    chain applied to its base (logits within fp32 tolerance), written with its manifest, tokenizer, chat
    template and recorded system prompt. A failed check leaves nothing at OUT."""
    if is_full_model(source):
        raise LorakitError(f"{source} is a fully fine-tuned model, not an adapter: it has no adapter to flatten; "
                           f"serve it as --model, or export it as a model folder")
    out = output_path(out)
    check_output(out, overwrite=overwrite, inputs=inputs_of([source], model_name))
    chain = adapter_chain(source)
    manifests = [read_manifest(folder) for folder in chain]
    last = read_manifest(source) or Manifest(kind="adapter")
    quantization = trained_quantization(manifests)
    name = model_name or base_of(source)
    tokenizer = load_tokenizer(name)
    probe = text_probe(tokenizer)
    reference = _chain_logits(name, tokenizer, chain, quantization, device, probe, force)
    base = load_model(name, torch.float32, device, quantization=quantization)
    flat = flatten_into(base, chain)
    flat.set_adapter(FLAT)
    drift = None
    with staging(out) as folder:
        flat.save_pretrained(folder, selected_adapters=[FLAT])
        _unnest(folder)
        record_base(folder)
        tokenizer.save_pretrained(folder)
        del flat, base
        check = require_same_logits(reference, _reloaded_logits(name, folder, quantization, device, probe),
                                    torch.float32, f"flattening {source}")
        if quantization:  # what a server without the 4-bit base would give
            drift = (_reloaded_logits(name, folder, None, device, probe) - reference).abs().max().item()
            say(f"on the unquantized base, the flattened adapter's logits differ from the QLoRA model as trained "
                f"by up to {drift:.3g}")
        rank = rank_of(folder)
        manifest = Manifest(kind="adapter", method="lora", stage=last.stage, base_model=last.base_model or name,
                            base_model_path=last.base_model_path, base_fingerprint=last.base_fingerprint,
                            system_prompt=last.system_prompt, reasoning=last.reasoning, quantization=quantization, verify=check,
                            drift_from_trained=drift, sources=[str(Path(f).resolve()) for f in chain],
                            lora={"r": rank, "alpha": rank, "flattened": len(chain)})
        manifest.write(folder)
        say(f"flattened {len(chain)} adapter(s) into one of rank {rank}: logits match the chain on its "
            f"base (max difference {check['max_logit_diff']:.2g})")
        return publish(folder, out, overwrite=overwrite)


def _chain_logits(name: str, tokenizer, chain: list[Path], quantization, device: str, probe,
                  force: bool) -> torch.Tensor:
    """The chain as training saw it (its base checked): parents merged into the base (quantized as
    trained), the last adapter on top."""
    base = load_model(name, torch.float32, device, quantization=quantization)
    model = apply_chain(base, [str(chain[-1])], fingerprint(base.config, tokenizer), name, force=force)
    return logits(model.eval(), probe)


def _reloaded_logits(name: str, folder: Path, quantization, device: str, probe) -> torch.Tensor:
    """The written adapter, loaded by plain peft onto a fresh base."""
    from peft import PeftModel

    base = load_model(name, torch.float32, device, quantization=quantization)
    return logits(PeftModel.from_pretrained(base, str(folder)).eval(), probe)


def _unnest(folder: Path) -> None:
    """peft saves a non-default adapter under a subfolder of its name: move it to the top."""
    nested = folder / FLAT
    if nested.is_dir():
        for item in nested.iterdir():
            shutil.move(str(item), folder / item.name)
        nested.rmdir()


def rank_of(folder: Path) -> int:
    """A plain peft LoRA adapter's rank, from its adapter_config.json."""
    import json

    return json.loads((folder / "adapter_config.json").read_text())["r"]
