"""The `lorakit` command.

Commands live in modules by subject (training, data, weights, inference, demo), each listing its
commands in COMMANDS and importing nothing from here; this module builds the group and registers them,
so the dependency runs one way (as trl's `command.register(subparsers)` and litgpt's PARSER_DATA do).
Each command parses, calls one library function, prints.
"""

from __future__ import annotations

import sys

import click

from ..errors import Interrupted, LorakitError
from . import data, demo, inference, training, weights


class Group(click.Group):
    """Prints a LorakitError as one line and exits 1 (Ctrl-C: 130); --debug shows the traceback instead.
    A mistake on the command line itself (a bad option value) is one line too, exit 2."""

    def main(self, args=None, prog_name=None, **extra):
        from ..system.threads import share_cores

        share_cores()  # before anything imports torch
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
        from ..log import is_main, survive_broken_pipes

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
        # peft's advice to convert a PiSSA/OLoRA adapter: lorakit converts it as it writes it (weights/variants.py)
        warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights")

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


for module in (training, data, weights, inference, demo):
    for command in module.COMMANDS:
        main.add_command(command)
