"""A busy machine: how fast one lorakit training run goes while another process is busy, for each
thread setting lorakit could choose (issue 12, item 6).

    python bench/busy.py                 # about 30 minutes on 2 CPU cores (3 repeats)
    python bench/busy.py --steps 20 --quick

The workload is the same lorakit CPT run (the `small` shape: hidden 256, 4 layers, seq 256, batch 4)
in a fresh process per measurement, so each picks its threads up from the environment. The neighbours:
a single-threaded Python loop (another user's script, a CI job's interpreter), and a second PyTorch
process with its default threads (another training or test run). Tokens/s is read from lorakit's own
metrics.jsonl, between the first and the last logged step (the first step's warm-up excluded).
Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from common import cpt_recipe, ensure_model, logged_speed

HOG = "while True: pass"
TORCH_NEIGHBOUR = ("import torch\nx = torch.randn(512, 512)\nwhile True:\n    for _ in range(50): x = torch.tanh(x @ x)\n")
SETTINGS = {  # what the training process is started with (lorakit's own choice: lorakit/system/threads.py)
    "torch default (2 threads, libgomp spins 300k rounds)": {"LORAKIT_THREADS": "torch"},
    "1 thread (OMP_NUM_THREADS=1)": {"LORAKIT_THREADS": "torch", "OMP_NUM_THREADS": "1"},
    "passive waiting (OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000 (short spinning)": {"GOMP_SPINCOUNT": "10000"},
    "lorakit default (measured at start: busy -> passive, idle -> short spinning)": {},
}


TORCHRUN = {  # two processes on the 2 cores: threads per process
    "2 threads each, torch default spinning": {"LORAKIT_THREADS": "torch", "OMP_NUM_THREADS": "2"},
    "2 threads each, GOMP_SPINCOUNT=10000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "lorakit default (cores / processes = 1 thread each)": {},
}


def train_once(steps: int, env: dict, nproc: int = 1) -> float:
    """Tokens/s of one training run in a fresh process (all processes together with --nproc)."""
    recipe = cpt_recipe(ensure_model("small"), 256, f"max_steps: {steps}, batch_size: 4, logging_steps: 1, "
                                                     f"lr: 1.0e-4, save_steps: 0")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LORAKIT_THREADS")}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(recipe), "--nproc", str(nproc)],
                          cwd=recipe.parent,
                          env={**clean, **env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return logged_speed(recipe.parent / "out")[0]


def with_neighbour(code: str | None, env_for_neighbour: dict, measure):
    """Run `measure()` while `code` runs in another process (None: an idle machine)."""
    if code is None:
        return measure()
    neighbour = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env_for_neighbour})
    time.sleep(2)  # let it reach full speed
    try:
        return measure()
    finally:
        neighbour.kill()
        neighbour.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="only the torch default and lorakit's setting")
    parser.add_argument("--repeats", type=int, default=3, help="the median of this many runs per cell")
    args = parser.parse_args()
    ensure_model("small")
    settings = {k: v for k, v in SETTINGS.items() if not args.quick or k.startswith(("torch", "lorakit"))}
    neighbours = {"idle": (None, {}), "a busy 1-thread Python loop": (HOG, {}),
                  "a PyTorch job, default threads": (TORCH_NEIGHBOUR, {})}
    cells: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):  # settings interleaved, so a slow minute of the machine hits them all
        for neighbour, (code, neighbour_env) in neighbours.items():
            for setting, env in settings.items():
                value = with_neighbour(code, neighbour_env, lambda: train_once(args.steps, env))
                cells.setdefault((setting, neighbour), []).append(value)
                print(f"{setting} / {neighbour}: {value:.0f}", file=sys.stderr, flush=True)
    rows = [[setting] + [statistics.median(cells[setting, n]) for n in neighbours] for setting in settings]
    idle = rows[0][1]
    print(f"\nlorakit CPT, small shape, seq 256, batch 4, {args.steps} steps; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; median tokens/s of {args.repeats} runs "
          f"(and vs. the idle torch default)\n")
    print("| training process started with | " + " | ".join(neighbours) + " |")
    print("|---|" + "---:|" * len(neighbours))
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{v:.0f} ({v / idle:.2f}x)" for v in row[1:]) + " |")
    if args.quick:
        return
    print(f"\n`--nproc 2` (DDP, gloo) on the same {os.cpu_count()} cores, idle machine: tokens/s of both processes together\n")
    print("| threads per process | tokens/s |")
    print("|---|---:|")
    for setting, env in TORCHRUN.items():
        value = statistics.median(train_once(args.steps, env, nproc=2) for _ in range(args.repeats))
        print(f"{setting}: {value:.0f}", file=sys.stderr, flush=True)
        print(f"| {setting} | {value:.0f} |")


if __name__ == "__main__":
    main()
