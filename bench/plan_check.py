"""`lorakit plan` against measured peaks: LoRA / QLoRA / full at two sequence lengths.

    python bench/plan_check.py          # about 8 minutes on 2 CPU cores

Each configuration trains a few steps on the Qwen2-0.5B shape in a fresh process (batch 1 row of
the full sequence length, CPT, packed) and reports its peak memory (the whole process's peak RSS on a
CPU, torch.cuda.max_memory_allocated on a GPU) next to the plan's estimate for the same recipe. The
target is within 15%. On a GPU the sequence lengths are 1024 and 4096.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import PEAK_KIND, ROOT, cpt_recipe, device, ensure_model, peak_memory_gib

METHODS = ("lora", "qlora", "full")
SEQS = {"cpu": (512, 1024), "cuda": (1024, 4096)}


def recipe_file(method: str, seq: int, shape: str) -> Path:
    return cpt_recipe(ensure_model(shape), seq, "max_steps: 3, batch_size: 1, save_steps: 0, lr: 1.0e-5", method)


def child(method: str, seq: int, shape: str) -> None:
    from lorakit.recipe import load_recipe
    from lorakit.training.plan import plan
    from lorakit.training.run import run

    recipe = load_recipe(recipe_file(method, seq, shape))
    estimate = plan(recipe)
    run(recipe)
    parts = {k: v / 2**30 for k, v in estimate["parts"].items() if not k.startswith("_")}
    print("RESULT " + json.dumps({"measured": peak_memory_gib(), "planned": estimate["total"] / 2**30, "parts": parts}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    shape = sys.argv[1] if len(sys.argv) > 1 else "0.5b"
    ensure_model(shape)
    rows = []
    for method, seq in [(m, s) for m in METHODS for s in SEQS[device()]]:
        proc = subprocess.run([sys.executable, __file__, "--child", method, str(seq), shape], capture_output=True,
                              text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} {seq} failed")
        r = json.loads(line[0][7:])
        rows.append((method, seq, r))
        print(f"{method} {seq}: {r}", file=sys.stderr, flush=True)
    print(f"\nQwen2-{shape} shape, CPT, batch 1, dtype auto, 3 steps, on {device()}; "
          f"measured = {PEAK_KIND[device()]}\n")
    print("| method | seq | planned (GiB) | measured (GiB) | planned / measured |\n|---|---|---|---|---|")
    for method, seq, r in rows:
        print(f"| {method} | {seq} | {r['planned']:.2f} | {r['measured']:.2f} | {r['planned'] / r['measured']:.2f} |")


if __name__ == "__main__":
    main()
