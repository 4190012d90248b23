"""`lorakit demo`: the whole product, offline, on a tiny model."""

from __future__ import annotations

import click


@click.command()
@click.option("--workdir", default=".lorakit/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the tiny model is built (the adapters go to adapters/).")
def demo(workdir):
    """Offline demo: build a tiny Qwen2, run CPT then SFT on the bundled data, compare answers."""
    from ..demo import run_demo

    run_demo(workdir, echo=click.echo)


COMMANDS = [demo]
