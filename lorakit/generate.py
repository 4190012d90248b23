"""Pure text generation and chat replies; the interactive loop lives in the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.chat import end_of_turn, render_text, with_system


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    max_new_tokens: int = 128
    greedy: bool = False
    """Reproducible output: always the most likely next token."""
    seed: int | None = None


def _generate(model, tokenizer, prompt_ids: list[int], sampling: Sampling, stop_ids: list[int]) -> str:
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    options = {"do_sample": False} if sampling.greedy else {
        "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, **options)
    new = output[0, len(prompt_ids):].tolist()
    while new and new[-1] in stop_ids:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=False)


def generate_text(model, tokenizer, prompt: str, sampling: Sampling = Sampling()) -> str:
    """Continue `prompt` as raw text (what a CPT adapter learned); stops at EOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return _generate(model, tokenizer, ids, sampling, [tokenizer.eos_token_id])


def chat_reply(model, tokenizer, messages: list[dict], system_prompt: str | None,
               sampling: Sampling = Sampling()) -> str:
    """The assistant's next turn, rendered with the chat template and the recorded system prompt."""
    text = render_text(tokenizer, with_system(messages, system_prompt), generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = sorted({tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id})
    return _generate(model, tokenizer, ids, sampling, stops)
