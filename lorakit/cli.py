"""The `lorakit` command: each sub-command parses, calls one library function, prints."""

from __future__ import annotations

import os
import sys

import click

from .errors import Interrupted, LorakitError


class Group(click.Group):
    """Prints a LorakitError as one line and exits 1 (Ctrl-C: 130); --debug shows the traceback instead.
    A mistake on the command line itself (a bad option value) is one line too, exit 2."""

    def main(self, args=None, prog_name=None, **extra):
        from .threads import share_cores

        self.busy_note = share_cores()  # before anything imports torch
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `lorakit` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "lorakit"
            click.echo(f"error: {exc.format_message()} (see {command} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C while click itself was prompting
            click.echo("error: interrupted (Ctrl-C)", err=True)
            sys.exit(130)

    def invoke(self, ctx):
        from .log import is_main, survive_broken_pipes

        survive_broken_pipes()
        try:
            return super().invoke(ctx)
        except (LorakitError, KeyboardInterrupt) as exc:
            if ctx.meta.get("lorakit.debug"):
                raise
            if isinstance(exc, KeyboardInterrupt):  # not click's bare "Aborted!" and exit 1
                exc = Interrupted("interrupted (Ctrl-C)")
            if is_main():  # several processes: say it once
                click.echo(f"error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 1))


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
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a finished adapter already at the output.")
@click.option("--nproc", type=click.IntRange(1), default=1, help="Processes (GPUs) to train with, via torchrun.")
def train(recipe, overrides, full, resume, overwrite, nproc):
    """Train the adapter a RECIPE describes; OVERRIDES are key.sub=value."""
    from pathlib import Path

    from .log import is_main
    from .train import RunOptions, run

    r = _recipe(recipe, overrides + ("method=full",) if full else overrides)
    if getattr(main, "busy_note", None) and is_main():
        click.echo(main.busy_note, err=True)
    if nproc > 1:
        from .distributed import check_strategy, launch
        from .modeling import resolve_device

        check_strategy(r.train.strategy, resolve_device(r.train.device))
        sys.exit(launch(nproc, ["train", recipe, *overrides, *(["--full"] if full else []),
                                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]))
    out = run(r, RunOptions(resume=resume, overwrite=overwrite, recipe_file=Path(recipe)))
    from .distributed import end_process_group

    end_process_group()
    if is_main():
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
    from .adapters import base_of
    from .data.prepare import prepare
    from .data.preview import counts, spans
    from .modeling import load_tokenizer

    r = _recipe(recipe, overrides)
    tokenizer = load_tokenizer(r.model or base_of(r.parent))
    data = prepare(r, tokenizer)
    for example in data.examples[:examples]:
        click.echo(click.style(f"--- {example.where}", bold=True))
        click.echo("".join(click.style(f"[[{t}]]", fg="green") if trained else t
                           for t, trained in spans(example, tokenizer)))
    trained, masked = counts(data.examples)
    click.echo(f"{len(data.examples)} examples: {trained:,} trained tokens, {masked:,} masked tokens")
    for note in data.notes:
        click.echo(note)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--budget", help="Memory to fit in, like 8GB: also report the largest batch and sequence that fit.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Plan for this device (default: this machine's).")
def plan(recipe, overrides, budget, device):
    """Expected peak memory of a RECIPE's run, part by part, without loading the model."""
    from .plan import format_plan, parse_size
    from .plan import plan as make_plan

    r = _recipe(recipe, overrides)
    click.echo(format_plan(recipe, r, make_plan(r, parse_size(budget) if budget else None, device)))


@main.group()
def data():
    """Prepare data files."""


@data.command("text")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_text(folder, output, overwrite):
    """Turn a FOLDER of .txt files (one document each) into a JSON list of {"text": ...} records."""
    from .data.text import save_documents_json

    count = save_documents_json(folder, output, overwrite)
    click.echo(f"{count} documents written to {output}")


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


def _shard_size(text: str) -> str:
    """A size transformers' save_pretrained reads (2GB, 500MB, 1.5GiB), checked before any work."""
    import re

    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE):
        raise click.BadParameter(f"{text!r}: expected a size like 2GB or 500MB", param_hint="--shard-size")
    return text.strip()


def model_output_options(func):
    """The options shared by merge and export."""
    for option in reversed(MODEL_OUTPUT_OPTIONS):
        func = option(func)
    return func


def _export(sources, output, model, dtype, shard_size, onto, no_verify, force, overwrite):
    from pathlib import Path

    from .export import export
    from .modeling import resolve_device

    report = export(list(sources), Path(output), model=model, dtype=dtype, shard_size=shard_size, onto=onto,
                    verify=not no_verify, force=force, device=resolve_device(), overwrite=overwrite)
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
    report = combine(list(adapters), values, Path(options["output"]), combination, overwrite=options["overwrite"])
    click.echo(f"adapter written to {report['path']} ({combination} of {len(adapters)} adapters)")


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@model_output_options
def export(sources, **options):
    """Write SOURCES (an adapter, a CPT+SFT chain, or a model folder) as a deployable model folder."""
    _export(sources, **options)


@main.group()
def adapters():
    """List, show and clean up trained adapters."""


@adapters.command("list")
@click.argument("folder", default="adapters", type=click.Path(file_okay=False))
def adapters_list(folder):
    """Every adapter (and model) under FOLDER: name, stage, method, base, parent, size, final loss, date."""
    from .catalog import list_adapters

    click.echo(list_adapters(folder))


@adapters.command("clean")
@click.argument("folder", default="adapters", type=click.Path(file_okay=False))
def adapters_clean(folder):
    """Remove the half-written folders that killed runs and exports left under FOLDER."""
    from .catalog import clean

    click.echo(clean(folder))


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


from . import cli_inference  # noqa: E402,F401  (registers chat, generate, inspect, eval, compare, serve)
