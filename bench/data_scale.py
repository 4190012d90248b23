"""Data at corpus scale (issue 14): preparation time and memory, memory while training, the time to the
first optimizer step on a cache hit, and two processes, on generated corpora of 100 MB and 1 GB.

    python bench/data_scale.py --sizes 100,1000            # about 40 minutes on 2 CPU cores, ~8 GB of disk
    python bench/data_scale.py --sizes 10 --old-code DIR   # quick; DIR: a checkout of lorakit before issue 14
                                                            # (git worktree add DIR 5f24e45), run with this venv

The corpus: .jsonl documents of 0.2-20 KB, each English or Chinese (about a quarter Chinese), made of
sentences drawn from a fixed pool. The tokenizer: a byte-level BPE of 4,096 tokens with Qwen2's
pre-tokenizer, trained on 5 MB of the corpus; the model: a tiny Qwen2 (hidden 64, 2 layers) on it.
Every measurement is a fresh `lorakit` process; memory is sampled every 0.2 s over the process and its
children: the peak of their summed RSS, and the peak of their summed anonymous memory (RssAnon: what the
processes allocated, without the pages of memory-mapped files, which are page cache the kernel reclaims
as needed). Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = ROOT / ".lorakit" / "data-scale"
ENGLISH = ["the kettle boils water in under three minutes and switches itself off when the water is ready", "descale it once a month with white vinegar", "the warranty covers two years from the date of purchase", "our support team answers within one working day", "the lamp glows amber at night and turns off at dawn", "every roof in the village is painted green and the bakery opens at four in the morning"]
CHINESE = ["水壶在三分钟内把水烧开，水开后自动断电。", "每个月用白醋除垢一次。", "保修期自购买之日起两年。",
           "我们的客服在一个工作日内答复。", "台灯在夜里发出琥珀色的光，黎明时自动熄灭。", "村子里每个屋顶都漆成绿色。"]


def sentence_pool(seed: int = 0, size: int = 4000) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = " ".join(ENGLISH).split()
    english = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 24))).capitalize() + "." for _ in range(size)]
    chinese = ["".join(rng.choice(CHINESE) for _ in range(rng.randint(1, 4))) for _ in range(size)]
    return english, chinese


def write_corpus(path: Path, megabytes: int, seed: int = 1) -> Path:
    """`megabytes` of .jsonl documents of 0.2-20 KB."""
    if path.is_file() and path.stat().st_size >= megabytes * 10**6:
        return path
    english, chinese = sentence_pool()
    rng = random.Random(seed)
    written, target = 0, megabytes * 10**6
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            size = rng.randint(200, 20_000)
            pool, joiner = (chinese, "") if rng.random() < 0.25 else (english, " ")
            parts, length = [], 0
            while length < size:
                parts.append(rng.choice(pool))
                length += len(parts[-1].encode())
            line = json.dumps({"text": joiner.join(parts)}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())
    return path


def ensure_model(corpus: Path) -> Path:
    from lorakit.demo.tiny import build_tiny_qwen2

    out = WORK / "model"
    if not (out / "config.json").is_file():
        sample = corpus.read_text(encoding="utf-8")[:5_000_000].splitlines()
        texts = [json.loads(line)["text"] for line in sample[:-1]]
        build_tiny_qwen2(out, texts, instruct=False, hidden=64, layers=2, vocab_size=4096)
    return out


def recipe(corpus: Path, model: Path, cache: Path, steps: int = 20, num_proc: int = 0) -> Path:
    path = WORK / f"r-{corpus.stem}-{num_proc}.yaml"
    path.write_text(f"stage: cpt\nmodel: {model}\noutput: {WORK / 'out' / path.stem}\n"
                    f"data: {{path: {corpus}, max_length: 1024, cache_dir: {cache}, num_proc: {num_proc}}}\n"
                    f"train: {{max_steps: {steps}, batch_size: 4, logging_steps: 1, save_steps: 0, lr: 1.0e-4}}\n")
    return path


def measure(command: list[str], cwd: Path, first_step_of: Path | None = None, code: str | None = None) -> dict:
    """Wall time, peak summed RSS of the process tree, and (when `first_step_of` names a metrics.jsonl)
    the seconds until its first line appears."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": code} if code else {})}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lorakit", *command], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak, anon, rank, first = psutil.Process(process.pid), 0, 0, 0, None
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            each = [_anonymous(p.pid) for p in tree]
            anon, rank = max(anon, sum(each)), max(rank, max(each))
        except psutil.Error:
            pass
        if first_step_of is not None and first is None and first_step_of.is_file() and first_step_of.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.2)
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_gib": peak / 2**30, "anon_gib": anon / 2**30,
            "largest_process_anon_gib": rank / 2**30, "first_step_s": first, "stdout": out, "stderr": err}


def _anonymous(pid: int) -> int:
    """Bytes of anonymous resident memory (RssAnon) of a process, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tokens_of(cache: Path) -> int:
    entry = next(p for p in cache.iterdir() if (p / "meta.json").is_file())
    return json.loads((entry / "meta.json").read_text())["stats"]["tokens"]


def run_folder_metrics(recipe_path: Path) -> Path:
    return WORK / "out" / f".{recipe_path.stem}.run" / "metrics.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB")
    parser.add_argument("--old-code", help="a checkout of lorakit before issue 14, for the before row on the "
                                           "smallest corpus")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    corpora = {mb: write_corpus(WORK / f"corpus-{mb}mb.jsonl", mb) for mb in sizes}
    model = ensure_model(corpora[sizes[0]])
    rows = []
    for mb, corpus in corpora.items():
        for procs in (1, 2):
            cache = WORK / f"cache-{mb}-{procs}"
            shutil.rmtree(cache, ignore_errors=True)
            r = recipe(corpus, model, cache, num_proc=procs)
            prep = measure(["data", "prepare", str(r)], WORK)
            tokens = tokens_of(cache)
            row = {"mb": mb, "procs": procs, "prep_s": prep["seconds"], "tok_per_s": tokens / prep["seconds"],
                   "prep_peak": prep["peak_gib"], "prep_anon": prep["anon_gib"], "tokens": tokens}
            if procs == 2:  # training on the cache hit: memory and the time to the first optimizer step
                shutil.rmtree(WORK / "out", ignore_errors=True)
                train = measure(["train", str(r)], WORK, run_folder_metrics(r))
                row.update(train_peak=train["peak_gib"], train_anon=train["anon_gib"],
                           first_step_s=train["first_step_s"], hit="read from the cache" in train["stderr"])
                shutil.rmtree(WORK / "out", ignore_errors=True)
                cache2 = WORK / f"cache-{mb}-ddp"
                shutil.rmtree(cache2, ignore_errors=True)
                ddp = measure(["train", str(recipe(corpus, model, cache2, num_proc=2)), "--nproc", "2"], WORK)
                row.update(ddp_peak=ddp["peak_gib"], ddp_rank_anon=ddp["largest_process_anon_gib"],
                           ddp_tokenized=ddp["stderr"].count("data: tokenizing"),
                           ddp_entries=sum(1 for p in cache2.iterdir() if p.is_dir()))
                shutil.rmtree(cache2, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    old = None
    if args.old_code:
        mb = sizes[0]
        shutil.rmtree(WORK / "out", ignore_errors=True)
        r = recipe(corpora[mb], model, WORK / "unused")
        r.write_text(r.read_text().replace(f", cache_dir: {WORK / 'unused'}, num_proc: 0", ""))
        result = measure(["train", str(r)], WORK, run_folder_metrics(r), code=str(Path(args.old_code).resolve()))
        old = {"mb": mb, "peak": result["peak_gib"], "anon": result["anon_gib"], "first_step_s": result["first_step_s"]}
        print(json.dumps(old), file=sys.stderr, flush=True)
    report(rows, old)


def report(rows: list[dict], old: dict | None) -> None:
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; tiny Qwen2 (hidden 64, 2 layers, 4,096-token BPE); "
          f"max_length 1024, batch 4, packing on. Memory: peak summed RSS / peak summed anonymous memory, GiB\n")
    print("| corpus | tokens | num_proc | prepare (s) | tokens/s | memory preparing | memory, 20 steps on the cache | "
          "first optimizer step on a cache hit (s) | --nproc 2: tokenized; largest rank's anonymous memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        train = (f"{r['train_peak']:.2f} / {r['train_anon']:.2f} | {r['first_step_s']:.1f}" if "train_peak" in r
                 else "- | -")
        ddp = (f"{r['ddp_tokenized']}x ({r['ddp_entries']} cache entry); {r['ddp_rank_anon']:.2f}" if "ddp_peak" in r
               else "-")
        print(f"| {r['mb']} MB | {r['tokens']:,} | {r['procs']} | {r['prep_s']:.1f} | {r['tok_per_s']:,.0f} | "
              f"{r['prep_peak']:.2f} / {r['prep_anon']:.2f} | {train} | {ddp} |")
    if old:
        print(f"\nBefore issue 14 (rows in Python lists, tokenized on every run), {old['mb']} MB: `lorakit train` peaked "
              f"at {old['peak']:.2f} / {old['anon']:.2f} GiB and reached its first optimizer step after "
              f"{old['first_step_s']:.1f} s.")


if __name__ == "__main__":
    main()
