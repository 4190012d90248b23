"""The `lorakit` command: each sub-command parses, calls one library function, prints."""

from __future__ import annotations

import functools
import sys

import click

from .errors import LorakitError


class Group(click.Group):
    """Prints a LorakitError as one line and exits 1; --debug shows the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LorakitError as exc:
            if ctx.meta.get("lorakit.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.version_option(package_name="lorakit")
@click.pass_context
def main(ctx, debug):
    """Fine-tune Qwen2 with LoRA: continued pre-training on raw text, then chat SFT."""
    ctx.meta["lorakit.debug"] = debug
    if not debug:
        import logging
        import warnings

        import transformers

        # bitsandbytes (imported by peft) warns on every start about an optional CPU kernel package,
        # and the libraries' deprecation notices are not for our users to act on.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # once per layer call

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _recipe(path, overrides):
    from .recipe import load_recipe

    return load_recipe(path, overrides)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--full", is_flag=True, help="Full fine-tune: train every weight (same as method=full).")
def train(recipe, overrides, full):
    """Train the adapter a RECIPE describes; OVERRIDES are key.sub=value."""
    from .train import run

    r = _recipe(recipe, overrides + ("method=full",) if full else overrides)
    out = run(r)
    click.echo(f"{'model' if r.method == 'full' else 'adapter'} written to {out}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(recipe, overrides):
    """Check a RECIPE (keys, types, values) without loading a model."""
    from pathlib import Path

    r = _recipe(recipe, overrides)
    click.echo(f"{recipe}: ok ({r.stage}, {r.method}, model {r.model or 'from parent ' + str(r.parent)}, "
               f"output {r.output_dir})")
    for what, path in (("data.path", r.data.path), ("parent", r.parent)):
        if path and not Path(path).exists():
            click.echo(f"note: {what} {path} does not exist yet")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("-n", "--examples", default=2, show_default=True, help="How many examples to show.")
def preview(recipe, overrides, examples):
    """Show the first examples as the model sees them: [[trained]] spans marked, the rest masked."""
    from .data.prepare import prepare
    from .data.preview import counts, spans
    from .modeling import load_tokenizer

    r = _recipe(recipe, overrides)
    tokenizer = load_tokenizer(r.model or _base(r.parent))
    data = prepare(r, tokenizer)
    for example in data.examples[:examples]:
        click.echo(click.style(f"--- {example.where}", bold=True))
        click.echo("".join(click.style(f"[[{t}]]", fg="green") if trained else t
                           for t, trained in spans(example, tokenizer)))
    trained, masked = counts(data.examples)
    click.echo(f"{len(data.examples)} examples: {trained:,} trained tokens, {masked:,} masked tokens")
    for note in data.notes:
        click.echo(note)


def _base(parent):
    from .adapters import base_of

    return base_of(parent)


@main.group()
def data():
    """Prepare data files."""


@data.command("text")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
def data_text(folder, output):
    """Turn a FOLDER of .txt files (one document each) into a JSON list of {"text": ...} records."""
    from .data.text import save_documents_json

    count = save_documents_json(folder, output)
    click.echo(f"{count} documents written to {output}")


def inference_options(func):
    @click.option("--model", help="Base model: hub id or folder (default: the adapter's base).")
    @click.option("--adapter", type=click.Path(file_okay=False), help="Adapter folder to apply.")
    @click.option("--greedy", is_flag=True, help="Always take the most likely token (reproducible).")
    @click.option("--temperature", default=0.8, show_default=True)
    @click.option("--top-k", default=40, show_default=True)
    @click.option("--top-p", default=0.95, show_default=True)
    @click.option("--max-new-tokens", default=128, show_default=True)
    @click.option("--seed", type=int, help="Seed for sampling.")
    @click.option("--force", is_flag=True, help="Apply the adapter even to a base it was not trained on.")
    @functools.wraps(func)
    def wrapper(model, adapter, greedy, temperature, top_k, top_p, max_new_tokens, seed, force, **kwargs):
        from .adapters import load_for_inference
        from .generate import Sampling
        from .modeling import resolve_device, resolve_dtype

        device = resolve_device()
        lm, tokenizer, manifest = load_for_inference(model, adapter, device, resolve_dtype("auto", device), force)
        sampling = Sampling(temperature, top_k, top_p, max_new_tokens, greedy, seed)
        return func(lm=lm, tokenizer=tokenizer, manifest=manifest, sampling=sampling, **kwargs)
    return wrapper


@main.command()
@click.argument("prompt")
@inference_options
def generate(prompt, lm, tokenizer, manifest, sampling):
    """Continue PROMPT as raw text."""
    from .generate import generate_text

    click.echo(prompt + generate_text(lm, tokenizer, prompt, sampling))


@main.command()
@click.option("--prompt", help="Answer this one message and exit (interactive otherwise).")
@click.option("--system", help="System prompt (default: the one the adapter was trained with).")
@inference_options
def chat(prompt, system, lm, tokenizer, manifest, sampling):
    """Chat with a model and adapter; one-shot with --prompt."""
    from .data.chat import template_system_prompt
    from .generate import chat_reply

    if system is None:
        system = manifest["system_prompt"] if manifest and manifest.get("system_prompt") is not None \
            else template_system_prompt(tokenizer)
    if prompt is not None:
        click.echo(chat_reply(lm, tokenizer, [{"role": "user", "content": prompt}], system, sampling))
        return
    history: list[dict] = []
    click.echo("chat: an empty line or Ctrl-D ends the session, /reset forgets the conversation")
    while True:
        try:
            line = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
        except click.exceptions.Abort:  # Ctrl-D / Ctrl-C ends the session quietly
            return
        if not line.strip():
            return
        if line.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = chat_reply(lm, tokenizer, history, system, sampling)
        history.append({"role": "assistant", "content": reply})
        click.echo(f"assistant> {reply}")


@main.command()
@click.argument("model")
@click.option("--adapter", type=click.Path(file_okay=False), help="Adapter folder to apply.")
def inspect(model, adapter):
    """Print MODEL's parameter tensors, totals, and (with --adapter) the trainable share."""
    from .adapters import load_for_inference
    from .params import format_table, parameter_table

    import torch

    lm, _, _ = load_for_inference(model, adapter, "cpu", torch.float32)
    click.echo(format_table(parameter_table(lm), with_adapter=adapter is not None))


def model_output_options(func):
    @click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write.")
    @click.option("--model", help="Base model (default: the one in the adapter's manifest).")
    @click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
                  help="Dtype of the written weights.")
    @click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
    @click.option("--onto", type=click.Choice(["trained", "original"]), default="trained", show_default=True,
                  help="QLoRA: merge onto the dequantized weights it trained on, or the original ones.")
    @click.option("--no-verify", is_flag=True, help="Skip reloading OUT and comparing its logits.")
    @click.option("--force", is_flag=True, help="Apply adapters to a base they were not trained on.")
    @functools.wraps(func)
    def wrapper(**kwargs):
        return func(**kwargs)
    return wrapper


def _export(sources, output, model, dtype, shard_size, onto, no_verify, force):
    from pathlib import Path

    from .export import export
    from .modeling import resolve_device

    report = export(list(sources), Path(output), model=model, dtype=dtype, shard_size=shard_size, onto=onto,
                    verify=not no_verify, force=force, device=resolve_device())
    click.echo(f"model written to {report['path']} ({dtype})")


@main.command()
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

    from .combine import combine

    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise LorakitError(f"--weights {weights!r}: expected numbers separated by commas, like 0.6,0.4") from None
    report = combine(list(adapters), values, Path(options["output"]), combination)
    click.echo(f"adapter written to {report['path']} ({combination} of {len(adapters)} adapters)")


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@model_output_options
def export(sources, **options):
    """Write SOURCES (an adapter, a CPT+SFT chain, or a model folder) as a deployable model folder."""
    _export(sources, **options)


@main.group()
def adapters():
    """List and show trained adapters."""


@adapters.command("list")
@click.argument("folder", default="adapters", type=click.Path(file_okay=False))
def adapters_list(folder):
    """Every adapter (and model) under FOLDER: name, stage, method, base, parent, size, final loss, date."""
    from .catalog import list_adapters

    click.echo(list_adapters(folder))


@adapters.command("show")
@click.argument("name")
def adapters_show(name):
    """One adapter's manifest in full (NAME: a folder, or a name under adapters/)."""
    import json

    from .catalog import find

    click.echo(json.dumps(find(name), indent=2, ensure_ascii=False))


@main.command()
@click.option("--workdir", default=".lorakit/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the tiny model is built (the adapters go to adapters/).")
def demo(workdir):
    """Offline demo: build a tiny Qwen2, run CPT then SFT on the bundled data, compare answers."""
    from .demo import run_demo

    run_demo(workdir, echo=click.echo)
