"""Commands that take a recipe: train, validate, preview, plan."""

from __future__ import annotations

import sys

import click

from ..errors import LorakitError
from .options import load, recipe_arguments


@click.command()
@recipe_arguments
@click.option("--full", is_flag=True, help="Full fine-tune: train every weight (same as method=full).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a finished adapter already at the output.")
@click.option("--nproc", type=click.IntRange(1), default=1, help="Processes (GPUs) to train with, via torchrun.")
@click.option("--publish", metavar="URL", help="Then load the adapter into the server at URL (lorakit serve, or "
              "vLLM with runtime loading), replacing the one of the same name.")
@click.option("--api-key", envvar="LORAKIT_API_KEY", help="The --publish server's API key (default: $LORAKIT_API_KEY).")
def train(recipe, overrides, full, resume, overwrite, nproc, publish, api_key):
    """Train the adapter a RECIPE describes; OVERRIDES are key.sub=value."""
    from pathlib import Path

    from ..log import is_main

    r = load(recipe, overrides + ("method=full",) if full else overrides)  # checked before torch is imported
    if publish:
        from ..inference.publish import check_server

        if r.method == "full":
            raise LorakitError("--publish loads an adapter into a server; a full fine-tune is a model: serve it with "
                               "--model")
        check_server(publish, api_key)
    from ..system.threads import busy_note
    from ..training.run import RunOptions, run

    if busy_note() and is_main():
        click.echo(busy_note(), err=True)
    if nproc > 1:
        from ..training.distributed import check_strategy, launch
        from ..weights.loading import resolve_device

        check_strategy(r.train.strategy, resolve_device(r.train.device))
        sys.exit(launch(nproc, ["train", recipe, *overrides, *(["--full"] if full else []),
                                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                                *(["--publish", publish] if publish else [])]))
    out = run(r, RunOptions(resume=resume, overwrite=overwrite, recipe_file=Path(recipe)))
    from ..training.distributed import end_process_group

    end_process_group()
    if is_main():
        click.echo(f"{'model' if r.method == 'full' else 'adapter'} written to {out}")
        if publish:
            from ..inference.publish import publish as load_into

            name, seconds = load_into(publish, out, api_key)
            click.echo(f"published: {publish} serves it as {name!r} (loaded in {seconds:.1f} s)")


@click.command()
@recipe_arguments
def validate(recipe, overrides):
    """Check a RECIPE (keys, types, values) without loading a model."""
    from pathlib import Path

    r = load(recipe, overrides)
    click.echo(f"{recipe}: ok ({r.stage}, {r.method}, model {r.model or 'from parent ' + str(r.parent)}, "
               f"output {r.output_dir})")
    for what, path in [("data.path", s.path) for s in r.data.sources] + [("parent", r.parent)]:
        if path and not any(c in path for c in "*?[") and not path.startswith("hf:") and not Path(path).exists():
            click.echo(f"note: {what} {path} does not exist yet")


@click.command()
@recipe_arguments
@click.option("-n", "--examples", default=2, show_default=True, help="How many examples to show.")
def preview(recipe, overrides, examples):
    """Show the first examples as the model sees them: [[trained]] spans marked, the rest masked."""
    from ..data.prepare import first_examples, prepare
    from ..data.preview import side_name, spans
    from ..stages import stage as stage_of
    from ..weights.folders import base_of
    from ..weights.loading import load_tokenizer

    r = load(recipe, overrides)
    tokenizer = load_tokenizer(r.model or base_of(r.parent))
    data = prepare(r, tokenizer)  # every record checked; the figures below are the training rows'
    per_record = 2 if stage_of(r.stage).preference else 1  # both answers of a record
    for example in first_examples(r, tokenizer, examples * per_record):
        click.echo(click.style(f"--- {example.where}{side_name(r.stage, example.side)}", bold=True))
        click.echo("".join(click.style(f"[[{t}]]", fg="green") if trained else t
                           for t, trained in spans(example, tokenizer)))
    s = data.stats
    if s["rows"] is not None:
        click.echo(f"{s['examples']} examples: {s['trained_tokens']:,} trained tokens, "
                   f"{s['tokens'] - s['trained_tokens']:,} masked tokens")
    for note in data.notes:
        click.echo(note)


@click.command()
@recipe_arguments
@click.option("--budget", help="Memory to fit in, like 8GB: also report the largest batch and sequence that fit.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Plan for this device (default: this machine's).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes (GPUs) of the run: also each one's peak under ddp, fsdp and zero3.")
def plan(recipe, overrides, budget, device, nproc):
    """Expected peak memory of a RECIPE's run, part by part, without loading the model."""
    from ..training.plan import format_plan, parse_size
    from ..training.plan import plan as make_plan

    r = load(recipe, overrides)
    click.echo(format_plan(recipe, r, make_plan(r, parse_size(budget) if budget else None, device, nproc)))


COMMANDS = [train, validate, preview, plan]
