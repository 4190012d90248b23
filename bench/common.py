"""Shared pieces of the benchmarks: the model shapes, the workload text, peak memory."""

from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakit.demo.tiny import QWEN2_0_5B_SHAPE, build_tiny_qwen2

SHAPES = {
    "0.5b": QWEN2_0_5B_SHAPE,
    # the real checkpoints' shapes (config.json of Qwen/Qwen3-0.6B and meta-llama/Llama-3.2-1B)
    "qwen3-0.6b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}},
    "small": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
}
WORDS = ["kettle", "lamp", "river", "stone", "garden", "market", "harbour", "winter", "signal", "copper", "lantern", "meadow", "orbit", "silver", "engine", "valley", "thunder", "paper", "circle", "planet", "forest", "bridge", "mirror", "window", "shadow"]


def documents(count: int = 64, seed: int = 0, low: int = 64, high: int = 1000) -> list[str]:
    """`count` documents of varied length (low-high words: about 64-1024 tokens with the bench tokenizer)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "." for _ in range(count)]


def conversations(count: int = 64, seed: int = 1) -> list[dict]:
    """`count` chats: a short question, an answer of about 20-400 tokens."""
    rng = random.Random(seed)
    return [{"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "?"},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 300))) + "."},
    ]} for _ in range(count)]


def ensure_model(shape: str) -> Path:
    """A random-weight model of the named shape, built once under .lorakit/bench/: a Qwen2, or (a shape naming
    another model_type) that architecture with the same bench tokenizer (its ids fit any of these vocabularies;
    speed and memory depend on the shape, not on the words)."""
    out = ROOT / ".lorakit" / "bench" / (f"qwen2-{shape}" if shape in ("0.5b", "small") else shape)
    if not (out / "config.json").is_file():
        texts = documents(200) + [m["content"] for c in conversations() for m in c["messages"]]
        fields = dict(SHAPES[shape])
        model_type = fields.pop("model_type", "qwen2")
        build_tiny_qwen2(out, texts, instruct=False, shape=fields)
        if model_type != "qwen2":
            _rebuild(out, model_type, fields)
    return out


def _rebuild(out: Path, model_type: str, fields: dict) -> None:
    """The Qwen2 built above as another architecture of the same shape (its tokenizer kept)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen2 = json.loads((out / "config.json").read_text())
    keep = {k: qwen2[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(model_type, **fields, **keep, initializer_range=0.02)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)


def write_workload(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cpt, sft = folder / "cpt.jsonl", folder / "sft.jsonl"
    cpt.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents()))
    sft.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    return cpt, sft


def run_child(script: str, *args: str) -> dict:
    """Run one benchmark in a fresh process (`script --child ARGS`) and return the RESULT it printed."""
    import subprocess

    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(args)} failed")
    return json.loads(line[0][7:])


def logged_speed(adapter: Path) -> tuple[float, float]:
    """A finished run's tokens/s between its first and last logged step, and its last logged loss."""
    metrics = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = metrics[0], metrics[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]), last["loss"]


def run_ranks(script: str, nproc: int, *args: str) -> list[dict]:
    """`script --child ARGS` alone, or in `nproc` processes under torchrun (on a CPU each with its share of the
    cores); returns what each process handed to `report`, by rank. Files, not stdout: two ranks' lines interleave."""
    import os
    import subprocess
    import tempfile

    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAKIT_BENCH_OUT": out}
        if nproc > 1 and device() == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        proc = subprocess.run([sys.executable, *launcher, script, "--child", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        results = [json.loads(path.read_text()) for path in Path(out).glob("rank*.json")]
    if proc.returncode != 0 or len(results) != nproc:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{nproc} process(es), {' '.join(args[-2:])}: failed")
    return sorted(results, key=lambda r: r["rank"])


def report(result: dict) -> None:
    """A process of run_ranks hands back its figures (a dict with its `rank`)."""
    import os

    (Path(os.environ["LORAKIT_BENCH_OUT"]) / f"rank{result['rank']}.json").write_text(json.dumps(result))


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_gib() -> float:
    """The run's peak memory: `torch.cuda.max_memory_allocated` on a GPU, the process's peak RSS on a CPU."""
    import torch

    if device() == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


PEAK_KIND = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak RSS of the whole process"}


def matmul_peak_gflops(dtype_name: str = "bfloat16", seconds: float = 3.0) -> float:
    """The machine's matrix-multiply peak in this dtype, measured now on this run's device (the MFU
    denominator): 2048x2048 matmuls on a CPU, 8192x8192 on a GPU."""
    import time

    import torch

    where = device()
    size = 8192 if where == "cuda" else 2048
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(size, size, dtype=dtype, device=where) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def flop_params(model_dir: Path) -> int:
    """Parameters that cost matmul FLOPs per token: every linear layer of the blocks and the output head."""
    from transformers import AutoConfig

    from lorakit.training.plan import Shape

    shape = Shape.of(AutoConfig.from_pretrained(model_dir))
    return shape.block_linear_params + shape.vocab * shape.hidden


def cpt_recipe(model: Path, max_length: int, train: str, method: str = "lora") -> Path:
    """A CPT recipe on the generated documents, in a fresh temporary folder (its output there too)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    cpt, _ = write_workload(work)
    path = work / "bench.yaml"
    path.write_text(f"stage: cpt\nmodel: {model}\nmethod: {method}\ndata: {{path: {cpt}, max_length: {max_length}}}\n"
                    f"train: {{{train}}}\noutput: {work / 'out'}\n")
    return path
