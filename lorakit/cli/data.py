"""`lorakit data`: preparing data files."""

from __future__ import annotations

import click


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


COMMANDS = [data]
