"""The one error type lorakit raises for a user's mistake.

The CLI prints it as a single line (no traceback unless --debug) and exits non-zero; anything else
escaping is a bug in lorakit and keeps its traceback.
"""


class LorakitError(Exception):
    """A problem with the user's input, files or settings, worded for the user."""


class Interrupted(LorakitError):
    """Ctrl-C or SIGTERM: the work stopped cleanly (a training run wrote a checkpoint to resume from)."""

    exit_code = 130
