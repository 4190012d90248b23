"""What the data cache's checksum costs: verifying an entry against the time to read its rows.

    python bench/cache_check.py [--corpus-gb 1.0] [--bytes-per-token 4]

A 1 GB text corpus is about 250 M tokens (about 4 bytes a token with a BPE vocabulary); prepared, its rows
hold input_ids, labels and position_ids as int32 (12 bytes a token: about 3 GB). This writes an entry of
that size in lorakit's row layout (random ids, 1024-token rows, written with pyarrow straight from numpy:
tokenizing a real gigabyte takes far longer and changes nothing here), seals it as lorakit does
(data/cache.py: xxh3 of every Arrow file in meta.json), then times, each in a fresh process, with the page
cache warm (the entry just written: a second run soon after the first) or, with --cold, dropped before
each step (as after a reboot):
  - damage(): the check that runs every time an entry is read (size, then xxh3 of every byte),
  - opening the rows as the Trainer does (datasets.Dataset.from_file, memory-mapped),
  - one pass over every row's input_ids (a lower bound on what one epoch reads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW = 1024

STEPS = {
    "checksum (damage)": "from lorakit.data import cache; assert cache.damage(p) is None",
    "open (Dataset.from_file)": "from datasets import Dataset; Dataset.from_file(str(p / 'train.arrow'))",
    "read every row once": ("from datasets import Dataset; d = Dataset.from_file(str(p / 'train.arrow')).with_format('numpy');"
                            " n = sum(len(b['input_ids']) for b in d.iter(batch_size=4096))"),
}


def write_entry(folder: Path, tokens: int) -> None:
    import numpy as np
    import pyarrow as pa

    from lorakit.data import cache

    rows = tokens // ROW
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids")])
    rng = np.random.default_rng(0)
    with pa.OSFile(str(folder / "train.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        offsets = pa.array(np.arange(0, 4096 * ROW + 1, ROW, dtype=np.int32))
        positions = pa.ListArray.from_arrays(offsets, pa.array(np.tile(np.arange(ROW, dtype=np.int32), 4096)))
        for start in range(0, rows, 4096):
            count = min(4096, rows - start)
            ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 151936, 4096 * ROW, dtype=np.int32)))
            writer.write_batch(pa.record_batch([ids, ids, positions], schema=schema).slice(0, count))
    cache.seal(folder, {"stats": {"rows": rows, "tokens": rows * ROW}, "notes": [], "created": "bench", "seconds": 0})


def timed(step: str, folder: Path, cold: bool) -> float:
    if cold:  # the first run after a reboot, or after other files pushed the entry out of memory (root only)
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    code = f"import time; from pathlib import Path; p = Path({str(folder)!r}); t = time.perf_counter(); {STEPS[step]}; " \
           f"print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus-gb", type=float, default=1.0)
    parser.add_argument("--bytes-per-token", type=float, default=4.0)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each step (needs root)")
    args = parser.parse_args()
    tokens = int(args.corpus_gb * 1e9 / args.bytes_per_token)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as work:
        folder = Path(work)
        start = time.perf_counter()
        write_entry(folder, tokens)
        size = (folder / "train.arrow").stat().st_size
        print(f"entry for a {args.corpus_gb:g} GB corpus: {tokens / 1e6:.0f} M tokens, {size / 2**30:.2f} GiB of rows "
              f"(written and sealed in {time.perf_counter() - start:.1f} s)")
        results = {step: [timed(step, folder, args.cold) for _ in range(3)] for step in STEPS}
        print(f"page cache: {'dropped before each step' if args.cold else 'warm (the entry was just written)'}")
        print("| step | seconds (3 runs) | median |\n|---|---|---|")
        for step, values in results.items():
            print(f"| {step} | {', '.join(f'{v:.2f}' for v in values)} | {sorted(values)[1]:.2f} |")
        print(json.dumps({k: sorted(v)[1] for k, v in results.items()}))


if __name__ == "__main__":
    main()
