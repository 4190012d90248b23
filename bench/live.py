"""From training to traffic (issue 24): how long after `lorakit train --publish URL` ends the new adapter answers
on a running `lorakit serve`, and how long the server took to load it, with requests for another adapter
streaming meanwhile (none may fail).

    python bench/live.py --shape 0.5b                          # about 5 minutes on 2 CPU cores
    python bench/live.py --shape 0.5b --vllm .venv-vllm/bin/vllm  # the same through lorakit serve --engine vllm

The server holds the Qwen2-0.5B shape (random weights, bf16 on this CPU) with one adapter; the adapter published
is a CPT adapter of r16 on every linear layer trained for 2 steps of 128 tokens (its training time is not the
point: the figures are the publishing and the first answer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, cpt_recipe, ensure_model


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--vllm", help="serve through vLLM: its program (as lorakit serve --vllm)")
    args = parser.parse_args()
    # vLLM's CPU build gets 10% of the memory for its KV cache: by default it took 80% (19.6 of 24 GiB), and the
    # kernel killed it for memory once training started beside it
    engine = ["--engine", "vllm", "--vllm", args.vllm, "--dtype", "bfloat16", "--enforce-eager", "--max-model-len",
              "1024", "--gpu-memory-utilization", "0.1"] if args.vllm else []
    model = ensure_model(args.shape)
    first = cpt_recipe(model, 128, "max_steps: 2, batch_size: 1, logging_steps: 1")
    subprocess.run([sys.executable, "-m", "lorakit", "train", str(first)], check=True, cwd=ROOT,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(first.parent / "serve.log", "w")  # noqa: SIM115  (the server's, read when it exits)
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--adapter",
                               f"old={first.parent / 'out'}", "--port", str(port), *engine], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                              start_new_session=True)  # vLLM's engine processes go with it
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"lorakit serve exited: {(first.parent / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
        recipe = cpt_recipe(model, 128, "max_steps: 2, batch_size: 1, logging_steps: 1")
        ask = {"prompt": "The river", "max_tokens": 16, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            stop = time.monotonic() + 1e9
            background = pool.submit(lambda: [_post(f"{url}/v1/completions", {**ask, "model": "old"})[0]
                                              for _ in iter(lambda: time.monotonic() < stop, False)])
            trained = subprocess.run([sys.executable, "-m", "lorakit", "train", str(recipe), "--publish", url],
                                     cwd=ROOT, capture_output=True, text=True, check=True)
            ended = time.monotonic()
            name = (recipe.parent / "out").name
            status, body = _post(f"{url}/v1/completions", {**ask, "model": name})
            answered = time.monotonic()
            stop = time.monotonic()
            statuses = background.result()
        loaded = [line for line in trained.stdout.splitlines() if line.startswith("published:")][0]
        print(f"\nQwen2-{args.shape} shape, random weights, {'vLLM behind ' if args.vllm else ''}lorakit serve on CPU "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
        print(f"- train --publish: `{loaded}`")
        print(f"- from `lorakit train` exiting to the new adapter's first answer ({body['usage']['completion_tokens']} "
              f"tokens, status {status}): {answered - ended:.2f} s")
        print(f"- requests for the other adapter meanwhile: {len(statuses)}, failed: "
              f"{sum(s != 200 for s in statuses)}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
