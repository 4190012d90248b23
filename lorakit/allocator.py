"""glibc's allocator, kept from handing training memory back to the system between steps.

A training step on a CPU allocates and frees gigabytes of activations. With glibc's defaults, freed
blocks go back to the kernel (heap trimming, per-thread arenas shrunk, large blocks unmapped) and
every step faults the same pages in again: measured on the Qwen2-0.5B shape, a tenth of the step
time spent in the kernel, and 12-15% more tokens/s once it is kept (for about 0.3 GiB more peak RSS).
PyTorch has no caching allocator for CPU memory, and the usual fix (jemalloc or tcmalloc through
LD_PRELOAD) needs a system library and a launcher; glibc's own `mallopt` does it from inside the
process. Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP = {M_MMAP_THRESHOLD: 32 << 20,  # glibc's largest: blocks up to 32 MB come from the heap, reused
        M_TRIM_THRESHOLD: 16 << 30,  # never trim the heap's top between steps
        M_TOP_PAD: 1 << 30}  # grow the heap 1 GB at a time


def keep_freed_memory() -> bool:
    """Returns whether the allocator was tuned (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, min(value, 2**31 - 1)) == 1 for option, value in KEEP.items())
