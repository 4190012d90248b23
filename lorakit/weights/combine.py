"""Weighted combinations of adapters into a new adapter (peft's add_weighted_adapter), refused where
the result would not be what the user asked for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import LorakitError
from ..log import say
from .folders import (
    apply_adapter,
    base_of,
    check_adapter_folder,
    inputs_of,
    read_manifest,
)
from .loading import load_model, load_tokenizer
from .manifest import Manifest
from .outputs import check_output, output_path, publish, staging
from .variants import scale, variants_of, with_unit_scale
from .verify import logits, require_same_logits, text_probe

# cat is exact: the new adapter's update is the weighted sum of the inputs' updates (rank = sum of ranks).
# linear mixes A and B matrices separately, so its product carries cross terms: a blend, not a sum.
# svd truncates the exact sum to the largest input rank; ties prunes and elects signs by design.
EXACT = {"cat"}


def _configs(adapters: list[str]) -> list[dict]:
    return [json.loads((check_adapter_folder(a) / "adapter_config.json").read_text()) for a in adapters]  # checked


def refuse_if_wrong(adapters: list[str], manifests: list[Manifest], weights: list[float], combination: str) -> None:
    """The checks peft does not make, each with its reason."""
    if len(adapters) < 2:
        raise LorakitError("a weighted combination needs at least two --adapter")
    if len(weights) != len(adapters):
        raise LorakitError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    prints = {m.base_fingerprint for m in manifests}
    if len(prints) > 1:
        raise LorakitError("the adapters were trained on different base models; their updates cannot be added")
    if len({m.parent.path if m.parent else None for m in manifests}) > 1:
        raise LorakitError("the adapters were trained on top of different parents, so no single base fits "
                           "their sum; combine adapters trained on the same base")
    if len({m.quantization for m in manifests}) > 1:
        raise LorakitError("the adapters were trained on differently quantized bases; combine like with like")
    configs = _configs(adapters)
    for adapter, config in zip(adapters, configs):
        held = [v for v in variants_of(config) if v != "rsLoRA"]
        if held:
            raise LorakitError(f"{adapter}: a {held[0]} adapter cannot be combined: peft's combinations mix only "
                               f"LoRA matrices; merge it (lorakit export) instead")
    ranks = {c["r"] for c in configs}
    if combination in ("linear", "ties") and len(ranks) > 1:
        raise LorakitError(f"--combination {combination} needs equal ranks (got {sorted(ranks)}): it mixes the "
                           f"A and B matrices entry by entry; use --combination cat (exact) or svd")
    scales = {round(scale(c), 9) for c in configs}
    if combination == "linear" and len(scales) > 1:
        raise LorakitError(f"--combination linear with different alpha/r scalings {sorted(scales)} would weight "
                           f"the adapters other than asked; use --combination cat (exact)")


def combine(adapters: list[str], weights: list[float], out: Path, *, combination: str = "cat",
            device: str = "cpu", density: float = 0.5, overwrite: bool = False) -> Path:
    """Write the weighted combination as a new adapter that plain peft loads; returns its folder."""
    out = output_path(out)
    manifests = [read_manifest(a) or Manifest(kind="adapter") for a in adapters]
    refuse_if_wrong(adapters, manifests, weights, combination)
    check_output(out, overwrite=overwrite, inputs=inputs_of(adapters))
    name = base_of(adapters[0])
    tokenizer = load_tokenizer(name)
    base = load_model(name, torch.float32, device, quantization=manifests[0].quantization)
    model = base
    for i, adapter in enumerate(adapters):
        model = apply_adapter(model, adapter, merge=False, name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    exact = _exact_mix_logits(model, names, weights, tokenizer)
    with_unit_scale(model, names[0])
    model.add_weighted_adapter(names, weights, "default", combination_type=combination,
                               **({"density": density} if combination == "ties" else {}))
    model.set_adapter("default")
    for n in names:
        model.delete_adapter(n)
    mixed = logits(model, exact[0])
    diff = (mixed - exact[1]).abs().max().item()
    if combination in EXACT:
        require_same_logits(exact[1], mixed, torch.float32, f"the {combination} combination")
    else:
        say(f"--combination {combination} approximates the weighted sum: logits differ from it by up to {diff:.3g}")
    with staging(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        first = manifests[0]
        if first.parent and (Path(adapters[0]) / "parent").is_dir():
            shutil.copytree(Path(adapters[0]) / "parent", folder / "parent")
        Manifest(kind="combination", method="combination", base_model=first.base_model,
                 base_model_path=first.base_model_path, base_fingerprint=first.base_fingerprint, stage=first.stage,
                 quantization=first.quantization, system_prompt=first.system_prompt, reasoning=first.reasoning, parent=first.parent,
                 combination={"type": combination, "adapters": [str(Path(a).resolve()) for a in adapters],
                              "weights": weights, "max_logit_diff_from_exact_sum": diff}).write(folder)
        return publish(folder, out, overwrite=overwrite)


def _exact_mix_logits(model, names: list[str], weights: list[float], tokenizer):
    """Logits of base + sum_i w_i * update_i: every adapter active at once, each scaled by its weight."""
    from peft.tuners.lora import LoraLayer

    probe = text_probe(tokenizer)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for n, w in zip(names, weights):
            if n in layer.scaling:
                layer.scaling[n] *= w
    model.base_model.set_adapter(names)
    expected = logits(model, probe)
    for layer, scaling in zip(layers, saved):
        layer.scaling.update(scaling)
    model.base_model.set_adapter(names[0])
    return probe, expected
