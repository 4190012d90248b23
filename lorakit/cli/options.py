"""Options and loaders shared by several commands."""

from __future__ import annotations

import functools
import re

import click

force_option = click.option("--force", is_flag=True, help="Apply adapters even to a base they were not trained on.")


def load(path, overrides):
    """The recipe at `path` with `key.sub=value` overrides applied and every key checked."""
    from ..recipe import load_recipe

    return load_recipe(path, overrides)


def recipe_arguments(func):
    """RECIPE and its OVERRIDES, as every recipe command takes them."""
    func = click.argument("overrides", nargs=-1)(func)
    return click.argument("recipe", type=click.Path(dir_okay=False))(func)


def sampling_options(func):
    @click.option("--greedy", is_flag=True, help="Always take the most likely token (reproducible).")
    @click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
                  help="0 is greedy.")
    @click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0: no limit.")
    @click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
    @click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
    @click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Seed for sampling.")
    @force_option
    @functools.wraps(func)
    def wrapper(greedy, temperature, top_k, top_p, max_new_tokens, seed, **kwargs):
        from ..inference.generate import Sampling

        return func(sampling=Sampling(temperature, top_k, top_p, max_new_tokens, greedy, seed), **kwargs)
    return wrapper


def placement():
    """(device, dtype) for inference on this machine."""
    from ..weights.loading import resolve_device, resolve_dtype

    device = resolve_device()
    return device, resolve_dtype("auto", device)


def session_options(func):
    """--model, --adapter (repeatable) and --force: what eval, compare and serve load (`open_session`)."""
    func = force_option(func)
    func = click.option("--adapter", "adapters", multiple=True,
                        help="Adapter folder, or NAME=FOLDER; repeat for several.")(func)
    return click.option("--model", help="Base model (default: the first adapter's base).")(func)


def open_session(model, adapters, force):
    from ..inference.session import Session, parse_entries

    return Session(model, parse_entries(adapters), *placement(), force)


def _shard_size(text: str) -> str:
    """A size transformers' save_pretrained reads (2GB, 500MB, 1.5GiB), checked before any work."""
    match = re.fullmatch(r"\s*(\d+(\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise click.BadParameter(f"{text!r}: expected a size like 2GB or 500MB", param_hint="--shard-size")
    if float(match[1]) <= 0:
        raise click.BadParameter(f"{text!r}: a shard must hold something; expected a size like 2GB or 500MB",
                                 param_hint="--shard-size")
    return text.strip()


MODEL_OUTPUT_OPTIONS = [
    click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write."),
    click.option("--model", help="Base model (default: the one in the adapter's manifest)."),
    click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
                 help="Dtype of the written weights."),
    click.option("--shard-size", default="2GB", show_default=True, callback=lambda _c, _p, v: _shard_size(v),
                 help="Largest safetensors shard, like 2GB or 500MB."),
    click.option("--onto", type=click.Choice(["trained", "original"]), default="trained", show_default=True,
                 help="QLoRA: merge onto the dequantized weights it trained on, or the original ones."),
    click.option("--no-verify", is_flag=True, help="Skip reloading OUT and comparing its logits."),
    click.option("--force", is_flag=True, help="Apply adapters to a base they were not trained on."),
    click.option("--overwrite", is_flag=True, help="Replace what lorakit wrote earlier at OUT."),
]


def model_output_options(func):
    """The options shared by merge and export."""
    for option in reversed(MODEL_OUTPUT_OPTIONS):
        func = option(func)
    return func
