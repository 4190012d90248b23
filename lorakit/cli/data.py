"""`lorakit data`: preparing data (the cache of tokenized rows) and data files."""

from __future__ import annotations

import click

from ..errors import LorakitError
from .options import load, recipe_arguments


@click.group()
def data():
    """Prepare data files."""


@data.command("text")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_text(folder, output, overwrite):
    """Turn a FOLDER of .txt files (one document each) into a JSON list of {"text": ...} records."""
    from ..data.text import save_documents_json

    count = save_documents_json(folder, output, overwrite)
    click.echo(f"{count} documents written to {output}")


@data.command("prepare")
@recipe_arguments
def data_prepare(recipe, overrides):
    """Tokenize and pack a RECIPE's data into the cache now (training then starts at once), with its figures."""
    from ..data.prepare import prepare
    from ..stages import stage as stage_of
    from ..weights.folders import base_of
    from ..weights.loading import load_tokenizer

    r = load(recipe, overrides)
    if r.data.streaming:
        raise LorakitError("data.streaming is on: the data is tokenized while training reads it, never prepared ahead")
    prepared = prepare(r, load_tokenizer(r.model or base_of(r.parent), r.trust_remote_code))
    s = prepared.stats
    what = {"text": "documents", "chat": "conversations"}.get(stage_of(r.stage).data, "answers")
    click.echo(f"{s['examples']:,} {what} -> {s['rows']:,} rows of up to {r.data.max_length} tokens: "
               f"{s['tokens']:,} tokens, {s['trained_tokens']:,} trained"
               + (f", {s['split']:,} documents split into blocks" if s.get("split") else "")
               + (f"; {s['eval_rows']:,} evaluation rows" if s.get("eval_rows") else ""))
    for note in prepared.notes:
        click.echo(note)
    click.echo(f"cached in {prepared.location}")


COMMANDS = [data]
