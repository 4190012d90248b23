"""torchrun as `lorakit train --nproc N` runs it: `python -m lorakit.training.torchrun TORCHRUN-ARGS`.

torch's own launcher (torch.distributed.run's parse_args and run: its rendezvous, its agent, its signal handling),
less its report of a failure. When a process of the run fails, that process has already said why in lorakit's one
line; torchrun then logged the agent's SIGTERMs and raised ChildFailedError, a 30-line traceback and table after
that line. Here the launcher exits with the failed process's exit code instead, and speaks only for a process
that could not say anything itself (killed by a signal: out of memory, a segfault).
"""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the agent's notes on stopping ranks
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1  # the process said why itself (lorakit's one line, or its traceback)
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else ""
        print(f"error: process rank {rank} was killed by signal {-failure.exitcode} {name}".rstrip()
              + (" (out of memory?)" if failure.exitcode == -signal.SIGKILL else ""), file=sys.stderr)
        return 1
    except SignalException as exc:  # Ctrl-C or SIGTERM: the agent stopped the processes, each said what it did
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
