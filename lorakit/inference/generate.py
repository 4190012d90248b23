"""Pure text generation and chat replies; the interactive loop lives in the CLI, the HTTP one in serve.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.specials import encode_rendered
from ..data.template import PLAIN, Style, end_of_turn, render, with_bos, with_system
from ..data.tools import written_texts


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    max_new_tokens: int = 128
    greedy: bool = False
    """Reproducible output: always the most likely next token."""
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (a stop token came) or "length" (max_new_tokens ran out)."""


def text_prompt(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids of a raw-text prompt (led by BOS as CPT documents are) and the tokens that end a
    continuation (EOS)."""
    return with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"]), [tokenizer.eos_token_id]


def chat_prompt(tokenizer, messages: list[dict], system_prompt: str | None, style: Style = PLAIN,
                template_kwargs: dict | None = None, tools: list[dict] | None = None,
                prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of a conversation awaiting the assistant's turn, and the tokens that end the turn. `style`:
    the adapter's data.reasoning; `template_kwargs`: the caller's chat_template_kwargs over it; `tools`: the
    functions the model may call; `prefix`: the start of the turn, written for the model (a forced call)."""
    messages = with_system(messages, system_prompt)
    text = render(tokenizer, messages, generation_prompt=True, style=style, tools=tools,
                  **(template_kwargs or {})) + prefix
    stops = sorted({tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, style)), tokenizer.eos_token_id})
    ids = encode_rendered(tokenizer, text, written_texts(style.messages(messages)))[0]  # text stays text
    return with_bos(tokenizer, ids), stops


class _Cancelled:
    """A StoppingCriteria that ends generation once `event` is set (the client went away)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def complete(model, tokenizer, prompt_ids: list[int], stop_ids: list[int], sampling: Sampling, *,
             stop_strings: tuple[str, ...] = (), cancel=None) -> Generation:
    """Generate after `prompt_ids` until a stop token, a stop string (cut from the text), max_new_tokens,
    or `cancel` (a threading.Event) is set."""
    from transformers import StoppingCriteriaList

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    options = {"do_sample": False} if sampling.greedy or sampling.temperature == 0 else {
        "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    if stop_strings:
        options.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if cancel is not None:
        options["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, **options)
    new = output[0, len(prompt_ids):].tolist()
    stopped = bool(new) and new[-1] in stop_ids
    count = len(new)
    while new and new[-1] in stop_ids:
        new.pop()
    text = tokenizer.decode(new, skip_special_tokens=False)
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut >= 0:
        text, stopped = text[:cut], True
    reason = "stop" if stopped else "cancelled" if cancel is not None and cancel.is_set() else "length"
    return Generation(text, len(prompt_ids), count, reason)


def generate_text(model, tokenizer, prompt: str, sampling: Sampling = Sampling()) -> str:
    """Continue `prompt` as raw text (what a CPT adapter learned); stops at EOS."""
    ids, stops = text_prompt(tokenizer, prompt)
    return complete(model, tokenizer, ids, stops, sampling).text


def chat_reply(model, tokenizer, messages: list[dict], system_prompt: str | None,
               sampling: Sampling = Sampling(), style: Style = PLAIN, tools: list[dict] | None = None) -> str:
    """The assistant's next turn, rendered with the chat template, the recorded system prompt and reasoning
    (and the tools it may call)."""
    ids, stops = chat_prompt(tokenizer, messages, system_prompt, style, tools=tools)
    return complete(model, tokenizer, ids, stops, sampling).text
