"""The one error type lorakit raises for a user's mistake.

The CLI prints it as a single line (no traceback unless --debug) and exits non-zero; anything else
escaping is a bug in lorakit and keeps its traceback.
"""


class LorakitError(Exception):
    """A problem with the user's input, files or settings, worded for the user."""


class Interrupted(LorakitError):
    """Ctrl-C or SIGTERM: the work stopped cleanly (a training run wrote a checkpoint to resume from)."""

    exit_code = 130


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (a library's error, quoted inside one of ours)."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
