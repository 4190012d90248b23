"""GGUF export on the Qwen2-0.5B shape (issue 16): for each quantization lorakit writes, the export's
wall time (merge, verify, write, read back), the file's size, and llama.cpp's load time and greedy
generation speed through llama-cpp-python (when it is installed).

    python bench/gguf.py            # about 10 minutes on 2 CPU cores

The model: a random-weight Qwen2 with Qwen2-0.5B's shape (bench/common.py, saved in bf16 as the real
checkpoint is). Each export is a fresh `lorakit export` process; each load a fresh Llama object after
the file was read once (the page cache warm, as on a second start).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

from common import ROOT, ensure_model

QUANTS = ("f32", "f16", "bf16", "q8_0")
WORK = ROOT / ".lorakit" / "bench" / "gguf"


def folder_size(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def llama_figures(path) -> tuple[float, float] | None:
    """Load seconds and greedy tokens/s (64 tokens after a short prompt), or None without the binding."""
    try:
        import llama_cpp
    except ImportError:
        return None
    path.read_bytes()  # warm the page cache: every quantization loads from memory alike
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    load = time.perf_counter() - start
    prompt = llm.tokenize(b"The kettle boils water in", add_bos=False)
    start, count = time.perf_counter(), 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0):
        count += 1
        if count == 64:
            break
    return load, count / (time.perf_counter() - start)


def main() -> None:
    model = ensure_model("0.5b")
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for quant in QUANTS:
        out = WORK / quant
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorakit", "export", str(model), "--format", "gguf", "--quant", quant,
                        "-o", str(out), "--overwrite"], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - start
        rows.append((quant, seconds, (out / "model.gguf").stat().st_size, llama_figures(out / "model.gguf")))
        print(quant, rows[-1], file=sys.stderr, flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; random Qwen2 with Qwen2-0.5B's shape (494M parameters); "
          f"its bf16 safetensors: {folder_size(model) / 2**20:.0f} MiB\n")
    print("| --quant | export (s) | model.gguf (MiB) | llama.cpp load (s) | llama.cpp greedy tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for quant, seconds, size, llama in rows:
        load, speed = (f"{llama[0]:.2f}", f"{llama[1]:.1f}") if llama else ("-", "-")
        print(f"| {quant} | {seconds:.1f} | {size / 2**20:.0f} | {load} | {speed} |")


if __name__ == "__main__":
    main()
