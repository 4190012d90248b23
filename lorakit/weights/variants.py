"""The LoRA variants a recipe switches on (DoRA, rsLoRA, PiSSA/OLoRA and peft's other initialisations, trainable
tokens, LoRA+), in one place: what each is to peft, how an adapter using one is written so that it means what it
says on the original base, and where it can go downstream. peft implements every variant; lorakit decides
which combinations it can write faithfully, and refuses the rest, naming the variant, before any work.

    an adapter's variants      from its adapter_config.json (variants_of), whoever trained it
    its scale                  alpha / r, or alpha / sqrt(r) with rsLoRA (scale)
    where it cannot go         UNSUPPORTED: vLLM, llama.cpp's GGUF adapter, one flattened adapter of a chain
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from ..errors import LorakitError
from ..log import say
from ..recipe import Recipe
from ..recipe.lora import LoraSettings

INITIAL = "initial-adapter"  # PiSSA/OLoRA: the adapter as it started, in the run folder (peft's conversion reads it)


def lora_config(settings: LoraSettings, token_ids: list[int]):
    """The peft LoraConfig a recipe's `lora` section asks for."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target, task_type="CAUSAL_LM", use_dora=settings.use_dora,
                      use_rslora=settings.use_rslora,
                      init_lora_weights=True if settings.init == "default" else settings.init,
                      trainable_token_indices=token_ids or None)


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """lora.trainable_tokens as ids: each must be one token of the vocabulary (no embedding is resized)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise LorakitError(f"lora.trainable_tokens {missing[0]!r} is not a token of this tokenizer's vocabulary; "
                           f"name tokens it already has (its special or reserved tokens: "
                           f"{', '.join(tokenizer.all_special_tokens[:6])}, ...)")
    return [vocab[t] for t in tokens]


def check_recipe(recipe: Recipe, reference: bool) -> None:
    """Combinations whose adapter could not be written to mean, on the original base, what was trained.
    `reference`: the stage compares against a reference model (dpo, kto), which for an adapter is the base
    with the adapter switched off."""
    lora = recipe.lora
    for engine in recipe.serve_with:  # what the adapter is meant for, said before anything trains
        held = [v for v in lora.variants if v in UNSUPPORTED.get(ENGINES[engine], {})]
        if held:
            say(f"warning: serve_with {engine}: this recipe trains a {held[0]} adapter, and "
                f"{ENGINES[engine]} cannot apply it ({UNSUPPORTED[ENGINES[engine]][held[0]]}); "
                f"{INSTEAD[ENGINES[engine]]}")
        if engine == "vllm" and lora.r * (2 if lora.rewrites_base else 1) > VLLM_MAX_RANK:
            say(f"warning: serve_with vllm: this recipe writes a rank-{lora.r * (2 if lora.rewrites_base else 1)} "
                f"adapter, above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK})")
    if lora.init == "orthogonal" and recipe.method == "qlora":
        raise LorakitError("lora.init orthogonal with method: qlora: peft makes A and B in the dtype of the base's "
                           "weights, which a 4/8-bit base stores as integers; use method: lora, or another lora.init")
    if not lora.rewrites_base:
        return
    name = f"lora.init {lora.init}"
    why = "moves part of each weight into the adapter while training, and the adapter is converted back when written"
    if recipe.method == "qlora":
        raise LorakitError(f"{name} with method: qlora: {name.split()[-1]} {why}, but a 4/8-bit base cannot hold the "
                           f"rewritten weights exactly, so the converted adapter would not reproduce the trained "
                           f"model; use method: lora, or another lora.init")
    if lora.use_dora:
        raise LorakitError(f"{name} with lora.use_dora: DoRA's magnitudes are measured on the rewritten base, so no "
                           f"adapter on the original base reproduces them; use one of the two")
    if lora.trainable_tokens:
        raise LorakitError(f"{name} with lora.trainable_tokens: peft's conversion back to the original base keeps "
                           f"only the LoRA matrices; use one of the two")
    if reference:
        raise LorakitError(f"{name} with stage: {recipe.stage}: the reference model is the base with the adapter "
                           f"switched off, which {lora.init.split('_')[0]} has rewritten; use another lora.init")


def save_initial(model, run_folder: Path) -> Path:
    """PiSSA/OLoRA: save the adapter as it starts (marked as a plain LoRA init, as peft's conversion asks), so
    that the trained adapter can be written as the difference on the original base."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(run_folder / INITIAL)
    finally:
        config.init_lora_weights = init
    return run_folder / INITIAL


def save_options(recipe: Recipe, run_folder: Path) -> dict:
    """save_pretrained's options for the trained adapter: PiSSA/OLoRA are converted to a plain LoRA of twice
    the rank (A stacked with the start's A, B beside minus the start's B) that applies to the original base."""
    if recipe.method == "full" or not recipe.lora.rewrites_base:
        return {}
    return {"path_initial_model_for_weight_conversion": str(run_folder / INITIAL)}


def described(settings: LoraSettings, folder: Path) -> dict:
    """The manifest's `lora`: the recipe's settings, and the rank and alpha as written where they differ."""
    written = json.loads((folder / "adapter_config.json").read_text())
    out = {"r": settings.r, "alpha": settings.alpha, "target": settings.target, "variants": settings.variants}
    if settings.init != "default":
        out["init"] = settings.init
    if written["r"] != settings.r:
        out["written"] = {"r": written["r"], "alpha": written["lora_alpha"],
                          "converted_from": settings.init.split("_niter_")[0]}
    if settings.trainable_tokens:
        out["trainable_tokens"] = settings.trainable_tokens
    return out


# --- downstream: what an adapter holds, and where that cannot go ---

def variants_of(config: dict) -> list[str]:
    """The variants an adapter_config.json records, by name."""
    found = [name for name, on in (("DoRA", config.get("use_dora")), ("rsLoRA", config.get("use_rslora")),
                                   ("trainable tokens", config.get("trainable_token_indices")),
                                   ("modules_to_save", config.get("modules_to_save"))) if on]
    return found


def scale(config: dict) -> float:
    """What the update B @ A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


VLLM, GGUF_ADAPTER, FLATTENED = "vLLM", "llama.cpp's GGUF adapter", "one flattened adapter"
_MATRICES_ONLY = "holds only LoRA matrices, so the trained token rows would be silently dropped"
UNSUPPORTED = {
    VLLM: {"DoRA": "vLLM's LoRA layers apply no magnitude vector",
           "trainable tokens": f"vLLM's LoRA loader {_MATRICES_ONLY}",
           "modules_to_save": "vLLM loads no fully trained modules beside a LoRA"},
    GGUF_ADAPTER: {"DoRA": "the format holds A, B and one alpha: no magnitude vector",
                   "trainable tokens": f"the format {_MATRICES_ONLY}",
                   "modules_to_save": "the format holds only LoRA matrices"},
    FLATTENED: {"DoRA": "DoRA's magnitudes do not add up across a chain",
                "trainable tokens": "peft's concatenation of a chain keeps only the LoRA matrices",
                "modules_to_save": "peft's concatenation of a chain keeps only the LoRA matrices"},
}
INSTEAD = {VLLM: "serve it with lorakit serve, or export it merged (lorakit export) and serve that model folder",
           GGUF_ADAPTER: "export it merged instead (--format gguf)",
           FLATTENED: "export the chain merged (lorakit export), or merge the parent into a model folder and train "
                      "the child on that"}


def refuse(folders, where: str) -> None:
    """Stop, naming the adapter and its variant, when one of `folders` holds something `where` cannot apply."""
    for folder in folders:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        for variant in variants_of(config):
            if variant in UNSUPPORTED[where]:
                raise LorakitError(f"{folder}: a {variant} adapter cannot go to {where}: "
                                   f"{UNSUPPORTED[where][variant]}; {INSTEAD[where]}")


def with_unit_scale(model, first: str) -> None:
    """Before peft combines adapters into a new one: the combination folds each part's own scale into its
    matrices, and the new adapter's config is the first part's with alpha = r, so a first part with rsLoRA
    would scale the result by sqrt(r) again. Its config is made plain LoRA (its loaded layers keep their scale)."""
    model.peft_config[first] = replace(model.peft_config[first], use_rslora=False, use_dora=False)


def give_every_layer_the_cast_switch(model) -> None:
    """peft's disable_input_dtype_casting (run.py) reads cast_input_dtype_enabled on every tuner layer, and the
    trainable tokens' layer has none (peft 0.21 raises AttributeError): give it the default, which its own
    forward never reads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True


def let_token_rows_mix(model) -> None:
    """peft 0.21's trainable-tokens wrapper, in a batch that mixes adapters (lorakit serve's per-row adapters),
    hands the rows of an adapter without trainable tokens to its token layer, which holds no such adapter
    (KeyError). Those rows go through the unchanged embedding instead, as peft's LoRA layers skip the adapters
    they do not hold."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and not getattr(module, "lorakit_mixes", False):
            own = module._forward_wrapped_mixed_batch

            def forward(x, active_adapter, *args, _own=own, _module=module, **kwargs):
                if active_adapter not in _module.token_adapter.token_indices:
                    return _module.original_module(x, *args, **kwargs)
                return _own(x, active_adapter, *args, **kwargs)

            module._forward_wrapped_mixed_batch, module.lorakit_mixes = forward, True


def alone_in_a_batch(model) -> set[str]:
    """The adapters peft cannot run as some of a batch's rows (per-row `adapter_names`): DoRA's ("Cannot pass
    `adapter_names` when DoRA is enabled"). Their rows run in batches of their own."""
    return {name for name, config in getattr(model, "peft_config", {}).items() if getattr(config, "use_dora", False)}


# --- `lorakit check ADAPTER --for ENGINE`: the same knowledge, asked before anyone tries ---

ENGINES = {"vllm": VLLM, "llama.cpp": GGUF_ADAPTER, "ollama": GGUF_ADAPTER, "peft": None}
VLLM_MAX_RANK = 512  # the largest --max-lora-rank vLLM accepts


def why_not(folder, engine: str, max_rank: int = VLLM_MAX_RANK) -> str | None:
    """Why `engine` cannot apply the adapter at `folder` (its chain flattened into one where the engine takes
    one adapter), or None when it can."""
    from .folders import adapter_chain

    chain = adapter_chain(folder)
    if not chain:
        return None  # a complete model folder: every engine loads it as a model
    where = ENGINES[engine]
    configs = [json.loads((Path(f) / "adapter_config.json").read_text()) for f in chain]
    try:
        if where is not None and len(chain) > 1:
            refuse(chain, FLATTENED)
        if where is not None:
            refuse(chain, where)
    except LorakitError as exc:
        return str(exc)
    rank = sum(c["r"] for c in configs)
    if engine == "vllm" and rank > max_rank:
        return (f"{folder}: rank {rank}{' (the chain flattened)' if len(chain) > 1 else ''} is above the server's "
                f"--max-lora-rank {max_rank}")
    return None
