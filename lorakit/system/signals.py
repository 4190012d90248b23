"""Signal handlers for the length of a block, the previous ones put back after it."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable


@contextlib.contextmanager
def handling(signals: tuple[signal.Signals, ...], handler: Callable):
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
