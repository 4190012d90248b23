"""Commands that write or read model weights: merge, export, adapters list/show/clean, inspect."""

from __future__ import annotations

import sys

import click

from ..errors import LorakitError
from .options import model_output_options


def _export(sources, output, no_verify, **options):
    from pathlib import Path

    from ..weights.export import ExportSettings, export
    from ..weights.loading import resolve_device

    settings = ExportSettings(verify=not no_verify, device=resolve_device(), **options)
    path = export(list(sources), Path(output), settings)
    click.echo(f"model written to {path} ({settings.dtype})")


@click.command()
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Adapter folder; repeat for a chain (CPT then SFT) or a weighted combination.")
@click.option("--weights", help="Comma-separated weights: write a weighted combination as a new adapter.")
@click.option("--combination", type=click.Choice(["cat", "linear", "svd", "ties"]), default="cat",
              show_default=True, help="How --weights combine: cat is the exact weighted sum.")
@model_output_options
def merge(adapters, weights, combination, **options):
    """Fold adapters into their base and write a complete model (or, with --weights, a new adapter)."""
    if weights is None:
        return _export(adapters, **options)
    from pathlib import Path

    from ..weights.combine import combine

    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise LorakitError(f"--weights {weights!r}: expected numbers separated by commas, like 0.6,0.4") from None
    path = combine(list(adapters), values, Path(options["output"]), combination=combination,
                   overwrite=options["overwrite"])
    click.echo(f"adapter written to {path} ({combination} of {len(adapters)} adapters)")


FORMATS = ["model", "adapter", "gguf", "gguf-adapter"]


@click.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--format", "form", type=click.Choice(FORMATS), default="model", show_default=True,
              help="model: a merged model folder; adapter: the chain as one plain peft adapter (vLLM); gguf: a "
                   "merged model as GGUF (llama.cpp, Ollama); gguf-adapter: the chain as a llama.cpp LoRA GGUF.")
@click.option("--quant", help="--format gguf: f32, f16 (default), bf16 or q8_0.")
@click.option("--base-gguf", help="--format gguf-adapter: the base model's GGUF, for the Modelfile's FROM.")
@model_output_options
def export(sources, form, quant, base_gguf, **options):
    """Write SOURCES (an adapter, a CPT+SFT chain, or a model folder) as a deployable model folder, an
    adapter chain as one adapter (--format adapter), or either as GGUF for llama.cpp and Ollama."""
    if quant is not None and form != "gguf":
        raise LorakitError(f"--quant {quant}: only --format gguf is quantized (this is --format {form})")
    if base_gguf is not None and form != "gguf-adapter":
        raise LorakitError(f"--base-gguf: only for --format gguf-adapter (this is --format {form})")
    if form == "adapter":
        return _export_adapter(sources, **options)
    if form in ("gguf", "gguf-adapter"):
        return _export_gguf(sources, form, quant, base_gguf, **options)
    _export(sources, **options)


def _export_gguf(sources, form, quant, base_gguf, output, no_verify, **options):
    from pathlib import Path

    from ..weights.export import ExportSettings, export_gguf, export_gguf_adapter
    from ..weights.loading import resolve_device

    settings = ExportSettings(verify=True, device=resolve_device(), **options)
    if no_verify:
        raise LorakitError("--no-verify: a GGUF export is always checked (the merge, then the file read back)")
    if form == "gguf":
        quant = quant or "f16"
        path = export_gguf(list(sources), Path(output), settings, quant)
        return click.echo(f"model written to {path / 'model.gguf'} ({quant}), with {path / 'Modelfile'}")
    if len(sources) != 1:
        raise LorakitError("--format gguf-adapter takes one adapter (its parents come along from its parent/ copy)")
    path = export_gguf_adapter(sources[0], Path(output), settings, base_gguf)
    click.echo(f"adapter written to {path / 'adapter.gguf'}, with {path / 'Modelfile'}")


def _export_adapter(sources, output, model, force, overwrite, **unused):
    from pathlib import Path

    from ..weights.flatten import export_flat_adapter
    from ..weights.loading import resolve_device

    if len(sources) != 1:
        raise LorakitError("--format adapter takes one adapter (its parents come along from its parent/ copy)")
    path = export_flat_adapter(sources[0], Path(output), model_name=model, overwrite=overwrite, force=force,
                               device=resolve_device())
    click.echo(f"adapter written to {path} (the chain as one adapter)")


@click.group()
def adapters():
    """List, show and clean up trained adapters."""


@adapters.command("list")
@click.argument("folder", default="adapters", type=click.Path(file_okay=False))
def adapters_list(folder):
    """Every adapter (and model) under FOLDER: name, stage, method, base, parent, size, final loss, date."""
    from ..weights.catalog import list_adapters

    click.echo(list_adapters(folder))


@adapters.command("clean")
@click.argument("folder", default="adapters", type=click.Path(file_okay=False))
def adapters_clean(folder):
    """Remove the half-written folders that killed runs and exports left under FOLDER."""
    from ..weights.catalog import clean

    click.echo(clean(folder))


@adapters.command("show")
@click.argument("name")
def adapters_show(name):
    """One adapter's manifest in full (NAME: a folder, or a name under adapters/)."""
    import json

    from ..weights.catalog import find

    click.echo(json.dumps(find(name).to_dict(), indent=2, ensure_ascii=False))


@click.command()
@click.argument("model")
@click.option("--adapter", type=click.Path(file_okay=False), help="Adapter folder to apply.")
def inspect(model, adapter):
    """Print MODEL's parameter tensors, totals, and (with --adapter) the trainable share."""
    import torch

    from ..weights.folders import load_for_inference
    from ..weights.parameters import format_table, parameter_table

    lm, _, _ = load_for_inference(model, adapter, "cpu", torch.float32)
    click.echo(format_table(parameter_table(lm), with_adapter=adapter is not None))


@click.command()
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--for", "engines", multiple=True, required=True,
              type=click.Choice(["vllm", "llama.cpp", "ollama", "peft"]), help="An engine to check; repeat for more.")
@click.option("--max-lora-rank", type=click.IntRange(1), default=512, show_default=True,
              help="vLLM: the server's --max-lora-rank.")
def check(adapter, engines, max_lora_rank):
    """Say whether each engine can apply ADAPTER as trained (exit 1 if one cannot), and why not."""
    from ..weights.variants import why_not

    refused = 0
    for engine in engines:
        reason = why_not(adapter, engine, max_lora_rank)
        click.echo(f"{engine}: " + ("yes" if reason is None else f"no: {reason}"))
        refused += reason is not None
    if refused:
        sys.exit(1)


COMMANDS = [merge, export, adapters, inspect, check]
