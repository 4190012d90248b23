"""Evidence that training helped: perplexity side by side (`lorakit eval`), answers side by side
(`lorakit compare`), for the base model and each adapter of a Session."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data.blocks import IGNORE, Collator
from ..data.files import RECORD_SUFFIXES, data_files, read_records, read_text
from ..data.prepare import load_examples, to_rows
from ..errors import LorakitError
from ..training.loss import perplexity
from .generate import Sampling, chat_prompt, complete, text_prompt


def data_kind(path: str | Path) -> str:
    """"cpt" for raw text (.txt, or records with `text`), "sft" for conversations."""
    files = data_files(path, (".txt",) + RECORD_SUFFIXES)
    if files[0].suffix.lower() == ".txt":
        return "cpt"
    first = next(iter(read_records(files[0])), None)
    return "cpt" if isinstance(first and first.value, dict) and "text" in first.value else "sft"


def mean_loss(model, rows: list[dict], pad_token_id: int, batch_size: int = 4) -> tuple[float, int]:
    """Token-weighted mean loss over rows (every labelled token counted once) and the token count."""
    device = next(model.parameters()).device
    collate, total, count = Collator(pad_token_id), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            if n:
                # No KV cache: with one, transformers ignores packed position ids and lets packed
                # examples attend to each other.
                total += model(**batch, use_cache=False).loss.float().item() * n
                count += n
    return total / max(count, 1), count


def perplexities(session, path: str, max_length: int, batch_size: int = 4) -> list[dict]:
    """Loss and perplexity of the base and of each adapter on the data at `path`.

    Raw text counts every token; conversations count assistant tokens only, each rendered with the
    system prompt its adapter was trained with."""
    kind = data_kind(path)
    results, rows = [], {}  # rows per system prompt: the data is read and tokenized once for each
    for name in session.names:
        session.use(name)
        system = session.system_prompt() if kind == "sft" else None
        key = (system, session.style().reasoning)
        if key not in rows:
            examples = load_examples(kind, path, session.tokenizer, max_length, system, key[1])[0]
            rows[key] = to_rows(kind, examples, max_length, packing=True)
        with session.active() as model:
            loss, tokens = mean_loss(model, rows[key], session.tokenizer.pad_token_id, batch_size)
        results.append({"name": name, "loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
                        "counted": "every token" if kind == "cpt" else "assistant tokens"})
    return results


def format_perplexities(results: list[dict]) -> str:
    base = results[0]["loss"]
    lines = [f"{'model':<24} {'loss':>8} {'perplexity':>11} {'vs base':>9}  tokens ({results[0]['counted']})"]
    for r in results:
        change = f"{100 * (math.exp(r['loss'] - base) - 1):+.1f}%" if r["name"] != "base" else "-"
        lines.append(f"{r['name']:<24} {r['loss']:>8.4f} {r['perplexity']:>11.2f} {change:>9}  {r['tokens']}")
    return "\n".join(lines)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line) or .json/.jsonl records with `prompt` (or a first user message)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    else:
        prompts = [_prompt(r) for r in read_records(path)]
    if not prompts:
        raise LorakitError(f"{path}: no prompts found")
    return prompts


def _prompt(record) -> str:
    value = record.value
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        return value["prompt"]
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        for m in value["messages"]:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    raise LorakitError(f"{record.where}: no `prompt` field (nor a user message)")


def answers(session, prompts: list[str], sampling: Sampling, mode: str) -> dict[str, list[str]]:
    """{name: [answer per prompt]} for the base and each adapter."""
    table = {}
    for name in session.names:
        session.use(name)
        out = []
        for prompt in prompts:
            ids, stops = (chat_prompt(session.tokenizer, [{"role": "user", "content": prompt}], session.system_prompt(),
                                      session.style())
                          if mode == "chat" else text_prompt(session.tokenizer, prompt))
            with session.active() as model:
                out.append(complete(model, session.tokenizer, ids, stops, sampling).text)
        table[name] = out
    return table


def markdown_report(model: str, prompts: list[str], table: dict[str, list[str]], sampling: Sampling,
                    mode: str) -> str:
    decoding = "greedy" if sampling.greedy else (f"sampled (temperature {sampling.temperature}, top-k "
                                                 f"{sampling.top_k}, top-p {sampling.top_p}, seed {sampling.seed})")
    lines = ["# lorakit compare", "", f"- base model: `{model}`", f"- adapters: {', '.join(list(table)[1:]) or 'none'}",
             f"- mode: {mode}; decoding: {decoding}; at most {sampling.max_new_tokens} new tokens", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "> " + prompt.replace("\n", "\n> "), ""]
        lines += ["| model | answer |", "|---|---|"]
        for name, outs in table.items():
            cell = json.dumps(outs[i], ensure_ascii=False)[1:-1].replace("|", "\\|")
            lines.append(f"| {name} | {cell} |")
        lines.append("")
    return "\n".join(lines)
