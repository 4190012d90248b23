"""One request's side of generation: its tokens, its sampling, its stop rules and its stream. A row is the
same whether it runs alone or beside others (engine.py decides what runs together)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .generate import Generation, Sampling

if TYPE_CHECKING:
    from .engine import Request


class Row:
    """One request's side of a batch: its tokens, text and stopping."""

    def __init__(self, request: Request, tokenizer):
        self.request, self.tokenizer = request, tokenizer
        self.tokens: list[int] = []
        self.sent = ""
        self.reason: str | None = None
        self.generator = torch.Generator()
        if request.sampling.seed is not None:
            self.generator.manual_seed(request.sampling.seed)
        else:
            self.generator.seed()

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def choose_or_fail(self, logits: torch.Tensor) -> int:
        """The next token; a failure (a value that cannot be computed) ends this row alone, never the
        other clients' rows in the same batch."""
        try:
            return self.choose(logits)
        except Exception as exc:  # noqa: BLE001  (its request gets the error; the batch goes on)
            self.reason = "error"
            self.request.done.set_exception(exc)
            return self.tokenizer.pad_token_id

    def choose(self, logits: torch.Tensor) -> int:
        """The next token of this row (the pad token once it has finished)."""
        if self.finished:
            return self.tokenizer.pad_token_id
        request = self.request
        if request.cancel.is_set():
            self.reason = "cancelled"
            return self.tokenizer.pad_token_id
        token = sample(logits, request.sampling, self.generator)
        self.tokens.append(token)
        if token in request.stop_ids:
            self.reason = "stop"
            return token
        text, stopped = self._text()
        if stopped:
            self.reason = "stop"
        elif len(self.tokens) >= request.sampling.max_new_tokens:
            self.reason = "length"
        else:
            self._emit(held_back(text, request.stop_strings))
        return token

    def _text(self) -> tuple[str, bool]:
        """The text so far, cut at the first stop string (and whether one came)."""
        stop_ids, stops = self.request.stop_ids, self.request.stop_strings
        text = self.tokenizer.decode([t for t in self.tokens if t not in stop_ids], skip_special_tokens=False)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and self.request.emit is not None:
            self.request.emit(text[len(self.sent):])
        self.sent = max(self.sent, text, key=len)

    def finish(self) -> None:
        """Say the rest (what was held back) and resolve the request. A character whose bytes were cut off
        by the end of generation is left out, not sent as U+FFFD (vLLM's detokenizer does the same)."""
        if self.request.done.done():  # failed on its own (choose_or_fail)
            return
        if self.reason is None:
            self.reason = "length"
        text = self._text()[0].rstrip("\ufffd")
        self._emit(text)
        self.request.done.set_result(Generation(text, len(self.request.prompt_ids), len(self.tokens), self.reason))


def held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` without what is not sure yet: a character still being decoded, or an ending that could be
    the start of a stop string (streamed, it could not be taken back)."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - hold]


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy, or temperature, top-k and top-p, in that order (as transformers' generate applies them)."""
    if sampling.greedy or sampling.temperature == 0:
        return int(logits.argmax())
    # shifted so the largest is 0 before dividing: a temperature of 1e-40 then gives 0 and -inf (greedy in
    # effect) instead of inf - inf = NaN, which once failed every row of the batch
    logits = (logits - logits.max()) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.numel():
        cutoff = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > sampling.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
