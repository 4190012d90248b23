"""Does llama.cpp's q8_0 decode crash on this CPU, and does that depend on the model's shape?

    python bench/llama_q8.py [--hidden 64,128,256,512,896,1024]

For each hidden size: a tiny random Qwen2 (2 layers, the 0.5B model's head width of 64 where it divides),
written as GGUF by lorakit (q8_0 and f16), then decoded by llama-cpp-python (4 greedy tokens) in a process
of its own, so that a segfault is a row of the table (exit -11), not the end of the script. Prints the
table and the CPU's flags that matter (AMX, AVX512-VNNI, AVX512-BF16). Needs llama-cpp-python
(docs/deploy.md says how to get it)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# bench/gguf.py would shadow the `gguf` package that lorakit writes GGUF files with
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DECODE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False);"
          " print([t for _, t in zip(range(4), llm.generate([1, 5, 7], top_k=1, temp=0.0))])")
TEXTS = ["The Orbix lamp glows amber at night.", "Quartzfield is a small village.", "<|im_start|>user\nHello<|im_end|>\n"]


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    shown = [f for f in ("amx_int8", "amx_bf16", "amx_tile", "avx512_vnni", "avx512_bf16") if f in flags]
    return ", ".join(shown) or "none of amx/avx512_vnni/avx512_bf16"


def main() -> None:
    from lorakit.demo.tiny import build_tiny_qwen2
    from lorakit.weights.gguf import write_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", default="64,128,256,512,896,1024")
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}")
    print("| hidden | heads | quant | exit | greedy tokens |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for hidden in (int(h) for h in args.hidden.split(",")):
            heads = max(1, hidden // 64)
            shape = {"num_attention_heads": heads, "num_key_value_heads": 2 if heads % 2 == 0 else 1,
                     "intermediate_size": 4 * hidden}
            folder = build_tiny_qwen2(Path(work) / f"h{hidden}", TEXTS, instruct=True, hidden=hidden, shape=shape)
            for quant in ("q8_0", "f16"):
                path = folder / f"{quant}.gguf"
                write_model(folder, path, quant, chat=True)
                done = subprocess.run([sys.executable, "-c", DECODE, str(path)], capture_output=True, text=True)
                print(f"| {hidden} | {heads} | {quant} | {done.returncode} | {done.stdout.strip() or '-'} |", flush=True)


if __name__ == "__main__":
    main()
