"""One-line messages for the user, and terminal output that survives its reader going away.

Depends on nothing of lorakit's, so any module can say something without importing torch or the Trainer.
"""

from __future__ import annotations

import errno
import os
import sys


def is_main() -> bool:
    """Rank 0, or the only process: the one that speaks and writes (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def is_local_main() -> bool:
    """Rank 0 of this machine (torchrun's LOCAL_RANK), or the only process: the one that prepares what each
    machine needs on its own disk."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def say(message: str) -> None:
    """One line for the user, on stderr: from rank 0 only when several processes train together."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


class _SurvivesBrokenPipe:
    """A text stream whose writes never raise when the reader has gone (`lorakit train R | tee log`,
    Ctrl-C: the terminal signals tee too, tee dies first, and the next progress line would fail with
    EPIPE inside the Trainer, losing the checkpoint the Ctrl-C asked for). Once the pipe is broken, the
    file descriptor is pointed at /dev/null and the run carries on silently."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            return self._silence(exc, len(text))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._silence(exc, 0)

    def _silence(self, exc: OSError, count: int) -> int:
        if exc.errno not in (errno.EPIPE, errno.EINVAL):
            raise exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        return count

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_broken_pipes() -> None:
    """Wrap stdout and stderr (once) so that a vanished reader never stops the work."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivesBrokenPipe):
            try:
                stream.fileno()
            except (OSError, ValueError, AttributeError):
                continue  # not a real file (a test runner's capture): nothing to protect
            setattr(sys, name, _SurvivesBrokenPipe(stream))
