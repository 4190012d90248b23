"""CPU threads that degrade gracefully on a busy machine.

PyTorch's CPU build runs its parallel regions on GNU OpenMP (libgomp), whose idle threads spin for
300,000 rounds before they sleep while waiting for the next region. On a machine where another process
is busy, the two slow each other down far more than sharing would: measured on 2 cores
(bench/busy.py, bench/RESULTS.md), a lorakit run beside a PyTorch job with default threads fell to a
twenty-fifth of its idle speed, and beside a one-thread Python loop to 0.4x.

What helped depends on whether the machine is busy, which lorakit measures when it starts (the CPU time
the other processes took over 50 ms of /proc/stat), before torch is imported:
- busy (the threads torch will start need more cores than the other processes leave free, by half a
  core or more): OpenMP threads wait passively
  (OMP_WAIT_POLICY=PASSIVE), which kept 0.6x of the idle speed beside either neighbour;
- idle: threads spin 10,000 rounds (GOMP_SPINCOUNT) instead of 300,000, which costs nothing measurable
  on an idle machine (passive waiting cost 7% on the Qwen2-0.5B shape and 26% on a tiny one) and still
  keeps about ten times the default's speed if a spinning neighbour starts later.
One thread per process did as well as passive waiting when busy but cost 23-40% when idle. Several
processes under `--nproc` also split the cores between them (distributed.launch).

libgomp reads its settings once, when torch is first imported: `share_cores` must run before that (the
CLI calls it first thing). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept, and
LORAKIT_THREADS=torch keeps PyTorch's defaults altogether (for benchmarks).
"""

from __future__ import annotations

import os
import time

SPINS = "10000"
SAMPLE_S = 0.05
_note: str | None = None


def share_cores() -> str | None:
    """Choose how OpenMP threads wait; returns a line for the user when the machine was found busy."""
    if os.environ.get("LORAKIT_THREADS") == "torch" or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        return None
    sample = cores_in_use()
    threads = _threads()
    global _note
    if sample is not None and sample[1] - sample[0] < threads - 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _note = (f"other processes are using {sample[0]:.1f} of this machine's {sample[1]} cores: lorakit's "
                 f"{threads} threads wait passively, so that everyone keeps going")
        return _note
    os.environ["GOMP_SPINCOUNT"] = SPINS
    return None


def busy_note() -> str | None:
    """What share_cores found, for the training log: None on an idle machine."""
    return _note


def _threads() -> int:
    """The threads torch will start: OMP_NUM_THREADS, else one per core this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_in_use(seconds: float = SAMPLE_S) -> tuple[float, int] | None:
    """(cores kept busy by other processes right now, cores of the machine), from /proc/stat sampled over
    `seconds` while this process sleeps; None where there is no /proc/stat."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    return (first[2] * (total - idle) / total if total > 0 else 0.0), first[2]


def _cpu_times() -> tuple[int, int, int] | None:
    """(all jiffies, idle + iowait jiffies, cores) of the machine, from /proc/stat (the host's, in a container)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields[:8]), fields[3] + fields[4], max(cores, 1)
