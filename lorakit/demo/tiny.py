"""A tiny Qwen2 built on this machine: random weights, a BPE tokenizer trained on the given texts,
Qwen2's special tokens and ChatML template. It stands in for a hub download in the demo and the tests,
and loads through the same `from_pretrained` code as the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2-Instruct's own chat template, verbatim: the system prompt it inserts is what lorakit records.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normalizer and pre-split, wrapped as Qwen2Tokenizer.

    Trained with the very pipeline Qwen2Tokenizer rebuilds on load, so AutoTokenizer on the saved
    folder tokenizes exactly as here.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    return tokenizer


QWEN2_0_5B_SHAPE = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768}


def build_tiny_qwen2(out: str | Path, texts: list[str], *, instruct: bool = True, hidden: int = 64,
                     layers: int = 2, vocab_size: int = 1000, seed: int = 0, shape: dict | None = None) -> Path:
    """Write a tiny random Qwen2 (instruct: EOS <|im_end|>; base: EOS <|endoftext|>) to `out`.

    `shape` overrides config fields, e.g. QWEN2_0_5B_SHAPE for benchmarks at the real model's size
    (its vocabulary is then larger than the tokenizer's; the extra rows are never indexed)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = train_tokenizer(texts, vocab_size)
    eos = "<|im_end|>" if instruct else "<|endoftext|>"
    tokenizer.eos_token = eos
    tokenizer.pad_token = "<|endoftext|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids[eos], pad_token_id=ids["<|endoftext|>"],
    )
    if shape:  # the real model's init: benchmarks measure speed, not learning
        fields.update(shape, initializer_range=0.02)
    config = Qwen2Config(**fields)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]] if instruct else ids["<|endoftext|>"],
    )
    if shape:
        model = model.to(torch.bfloat16)  # saved as the real Qwen2 checkpoints are
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
