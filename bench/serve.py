"""Serving throughput and latency.

Issue 15, `--workload throughput`: generated tokens/s and p50/p95 request latency at 1, 4 and 16 concurrent clients
spread over two adapters, for `lorakit serve` before issue 15 (one lock), `lorakit serve` now (batched), and vLLM
behind `lorakit serve --engine vllm`.

    python bench/serve.py --old-code DIR [--vllm PATH]    # DIR: a checkout of lorakit before issue 15

Issue 24, `--workload mixed`: short requests (4 clients, 20 tokens each) beside long ones (2 clients asking
1,000 tokens, one after another): the short requests' p50/p95 latency alone and beside the long ones, for the code
before continuous batching (a checkout of ae74db2), now, and vLLM.

    python bench/serve.py --workload mixed --old-code DIR [--vllm PATH]

The model: a random tiny Qwen2 (hidden 256, 4 heads of 64, 2 layers, a 1,000-token BPE) with two random
LoRA adapters (r 16 on every linear layer), so that greedy answers run to max_tokens instead of stopping
early; every request is a completion of 64 tokens at temperature 0, alternating the two adapters. Each
client sends its requests one after another. Each server is a fresh process, measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / ".lorakit" / "serve-bench"
PROMPTS = ["The kettle", "Our support team", "Every roof in the village", "The warranty covers", "Descale it"]


def ensure_model() -> tuple[Path, dict[str, Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.demo.tiny import build_tiny_qwen2

    model = WORK / "model"
    if not (model / "config.json").is_file():
        texts = [p + " boils water in three minutes and turns itself off." for p in PROMPTS] * 40
        build_tiny_qwen2(model, texts, instruct=False, hidden=256, layers=2)
    adapters = {}
    for seed, name in enumerate(("a", "b")):
        folder = WORK / name
        if not (folder / "adapter_config.json").is_file():
            torch.manual_seed(seed)
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                  LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
            peft.save_pretrained(folder)
        adapters[name] = folder
    return model, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, adapters: dict[str, Path], code: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": code} if code else {})}
    args = [sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--port", str(port),
            *[f"--adapter={n}={p}" for n, p in adapters.items()], *extra]
    # `python -m` puts the working folder first on sys.path: run the old code from its own folder
    process = subprocess.Popen(args, env=env, cwd=code or ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(args)}")
            time.sleep(1)


def one(url: str, adapter: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - start, reply["usage"]["completion_tokens"]


def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    def client(index: int) -> list[tuple[float, int]]:
        return [one(url, "ab"[(index + i) % 2], PROMPTS[(index + i) % len(PROMPTS)], max_tokens)
                for i in range(per_client)]

    one(url, "a", PROMPTS[0], 4)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"tok_s": sum(r[1] for r in results) / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "requests": len(results)}


def mixed(url: str, short_tokens: int, long_tokens: int, shorts: int) -> dict:
    """Short requests' latencies alone, then beside clients that keep asking long ones."""
    import threading

    def short_client(index: int) -> list[tuple[float, int]]:
        return [one(url, "ab"[(index + i) % 2], PROMPTS[(index + i) % len(PROMPTS)], short_tokens)
                for i in range(shorts)]

    def long_client(index: int) -> list[tuple[float, int]]:
        done = []
        while not finished.is_set():
            done.append(one(url, "ab"[index % 2], PROMPTS[index], long_tokens))
        return done

    one(url, "a", PROMPTS[0], 4)  # warm-up
    finished = threading.Event()
    with ThreadPoolExecutor(max_workers=4) as pool:
        alone = sorted(r[0] for rs in pool.map(short_client, range(4)) for r in rs)
    with ThreadPoolExecutor(max_workers=6) as pool:
        longs = [pool.submit(long_client, i) for i in range(2)]
        time.sleep(1.0)  # the long ones are generating
        start = time.perf_counter()
        beside = [r for rs in pool.map(short_client, range(4)) for r in rs]
        wall = time.perf_counter() - start
        finished.set()
        long_results = [r for f in longs for r in f.result()]
    latencies = sorted(r[0] for r in beside)
    pick = lambda values, q: values[min(len(values) - 1, int(q * len(values)))]
    return {"alone_p50": statistics.median(alone), "alone_p95": pick(alone, 0.95),
            "p50": statistics.median(latencies), "p95": pick(latencies, 0.95), "short_tok_s": sum(r[1] for r in beside) / wall,
            "long_tokens": statistics.median(r[1] for r in long_results), "requests": len(beside)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=["throughput", "mixed"], default="throughput")
    parser.add_argument("--old-code", help="a checkout of lorakit before the change measured (served with this venv)")
    parser.add_argument("--old-label", help="what to call the old code in the table (default: the issue's before)")
    parser.add_argument("--vllm", help="vLLM's program or its environment's Python (as lorakit serve --vllm)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model, adapters = ensure_model()
    servers = {}
    before, now = (("lorakit serve before issue 15 (one lock)", "lorakit serve (batched)") if args.workload == "throughput"
                   else ("lorakit serve before issue 24 (a batch runs to its end)", "lorakit serve (continuous batching)"))
    if args.old_code:
        servers[args.old_label or before] = (str(Path(args.old_code).resolve()), [])
    servers[now] = (None, [])
    if args.vllm:
        servers["vLLM (CPU build) behind lorakit serve --engine vllm"] = (None, [
            "--engine", "vllm", "--vllm", args.vllm, "--dtype", "float32", "--enforce-eager", "--max-model-len",
            "512" if args.workload == "throughput" else "1100", "--gpu-memory-utilization", "0.08"])
    if args.workload == "mixed":
        return report_mixed(servers, model, adapters, args.requests // 4)
    rows = []
    for name, (code, extra) in servers.items():
        process, url = start(model, adapters, code, extra)
        try:
            for clients in (1, 4, 16):
                figures = load(url, clients, max(1, args.requests // clients), args.max_tokens)
                rows.append((name, clients, figures))
                print(name, clients, json.dumps(figures), file=sys.stderr, flush=True)
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; tiny Qwen2 (hidden 256, 2 layers) + 2 random LoRA "
          f"adapters; {args.max_tokens}-token greedy completions, adapters alternating\n")
    print("| server | clients | generated tokens/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, clients, f in rows:
        print(f"| {name} | {clients} | {f['tok_s']:.1f} | {f['p50']:.2f} | {f['p95']:.2f} |")


def report_mixed(servers: dict, model: Path, adapters: dict[str, Path], shorts: int) -> None:
    rows = []
    for name, (code, extra) in servers.items():
        process, url = start(model, adapters, code, extra)
        try:
            rows.append((name, mixed(url, 20, 1000, shorts)))
            print(name, json.dumps(rows[-1][1]), file=sys.stderr, flush=True)
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; tiny Qwen2 (hidden 256, 2 layers) + 2 random LoRA "
          f"adapters; 4 clients asking {shorts} greedy 20-token completions each, alone and beside 2 clients asking "
          f"1,000-token ones\n")
    print("| server | short p50 alone (s) | short p95 alone (s) | short p50 beside long (s) | short p95 beside long (s) "
          "| long answers' tokens (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, f in rows:
        print(f"| {name} | {f['alone_p50']:.3f} | {f['alone_p95']:.3f} | {f['p50']:.3f} | {f['p95']:.3f} "
              f"| {f['long_tokens']:.0f} |")


if __name__ == "__main__":
    main()
