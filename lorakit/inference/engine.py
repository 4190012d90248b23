"""Many requests generated together: one forward pass for a batch, each row with its own adapter
(peft's per-row `adapter_names`), its own sampling, stop tokens and strings, its own stream, and its own
cancellation (a client that goes away stops its row, not the batch).

Requests that arrive while a batch runs wait for the next one, which gathers everything queued (up
to `max_batch`); a batch ends when its last row does. Written here because transformers' generate()
takes one sampling setting and one stop rule for a whole batch and cannot stream or cancel per row;
vLLM (`lorakit serve --engine vllm`) is the engine for production traffic.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .generate import Generation, Sampling

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class Request:
    prompt_ids: list[int]
    stop_ids: list[int]
    sampling: Sampling
    adapter: str = BASE_ADAPTER
    """The peft adapter of this row (Session.adapter_of), or BASE_ADAPTER for the bare base."""
    stop_strings: tuple[str, ...] = ()
    emit: Callable[[str], None] | None = None
    """Called (from the engine's thread) with each piece of new text, for streaming."""
    cancel: threading.Event = field(default_factory=threading.Event)
    done: Future = field(default_factory=Future)
    """Resolves to the Generation (text, token counts, finish reason)."""
    submitted: float = field(default_factory=time.monotonic)


class Engine:
    """A thread that generates what is submitted, in batches, on one model. While it serves, it owns the
    model's active adapter (a batch of one adapter sets it); nothing else generates on that model."""

    def __init__(self, model, tokenizer, max_batch: int = 16, gather_s: float = 0.005,
                 between: Callable[[], Any] | None = None):
        self.model, self.tokenizer, self.max_batch, self.gather_s = model, tokenizer, max_batch, gather_s
        self.between = between
        """Called on the engine's thread between batches, after the tasks: returns the model to generate with (the
        session's, which drops the adapters no row holds and may have taken new ones)."""
        self.pending: queue.Queue[Request | None] = queue.Queue()  # None: a task is waiting, wake up
        self.tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.stats = {"batches": 0, "rows": 0, "largest": 0, "cancelled": 0, "prompt_tokens": 0,
                      "completion_tokens": 0, "queue_wait_s": 0.0}
        """Batches run, rows generated, the largest batch, rows stopped because their client left, tokens read
        and generated, and the seconds rows waited between their submission and their batch's start."""
        threading.Thread(target=self._serve, daemon=True, name="lorakit-engine").start()

    def submit(self, request: Request) -> Future:
        self.pending.put(request)
        return request.done

    def call(self, task: Callable[[], Any]) -> Future:
        """Run `task` on the engine's thread between batches, where nothing generates (loading or replacing an
        adapter changes the model's layers); resolves to its result."""
        done: Future = Future()
        self.tasks.put((task, done))
        self.pending.put(None)
        return done

    def _run_tasks(self) -> None:
        while not self.tasks.empty():
            task, done = self.tasks.get()
            try:
                done.set_result(task())
            except Exception as exc:  # noqa: BLE001  (the caller gets the error, the engine lives on)
                done.set_exception(exc)
        if self.between is not None:
            self.model = self.between()

    def _serve(self) -> None:
        while True:
            first = self.pending.get()
            self._run_tasks()
            if first is None:
                continue
            batch = [first]
            while len(batch) < self.max_batch:  # what arrives together (no gap over gather_s) runs together
                try:
                    item = self.pending.get(timeout=self.gather_s)
                except queue.Empty:
                    break
                if item is not None:
                    batch.append(item)
            live = [r for r in batch if not r.cancel.is_set()]
            for r in batch:
                if r.cancel.is_set():
                    r.done.set_result(Generation("", len(r.prompt_ids), 0, "cancelled"))
                    self.stats["cancelled"] += 1
            if not live:
                continue
            for group in self._groups(live):
                try:
                    self._generate(group)
                except Exception as exc:  # noqa: BLE001  (each waiting request gets the error, the thread lives on)
                    for r in group:
                        if not r.done.done():
                            r.done.set_exception(exc)
            self._run_tasks()

    def _groups(self, batch: list[Request]) -> list[list[Request]]:
        """The batch as forward passes can run it: together, except the rows of an adapter peft cannot mix
        with others (DoRA), which run as a batch of their own."""
        from ..weights.variants import alone_in_a_batch

        alone = alone_in_a_batch(self.model)
        if not alone or len({r.adapter for r in batch}) == 1:
            return [batch]
        apart = {name: [r for r in batch if r.adapter == name] for name in alone}
        rest = [r for r in batch if r.adapter not in alone]
        return [group for group in [rest, *apart.values()] if group]

    def _generate(self, batch: list[Request]) -> None:
        now = time.monotonic()
        self.stats["queue_wait_s"] += sum(now - r.submitted for r in batch)
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["largest"] = max(self.stats["largest"], len(batch))
        rows = [_Row(r, self.tokenizer) for r in batch]
        device = next(self.model.parameters()).device
        input_ids, attention = _left_padded([r.prompt_ids for r in batch], self.tokenizer.pad_token_id, device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad(), self._adapters([r.adapter for r in batch]) as extra:
            for _ in range(max(r.sampling.max_new_tokens for r in batch)):
                out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
                chosen = [row.choose_or_fail(out.logits[i, -1].float()) for i, row in enumerate(rows)]
                if all(row.finished for row in rows):
                    break
                input_ids = torch.tensor([[token] for token in chosen], device=device)
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
        for row in rows:  # counted before the answer goes out: a client that reads /metrics next sees its row
            self.stats["cancelled"] += row.reason == "cancelled"
            self.stats["prompt_tokens"] += len(row.request.prompt_ids)
            self.stats["completion_tokens"] += len(row.tokens)
            row.finish()


    @contextlib.contextmanager
    def _adapters(self, per_row: list[str]):
        """The forward pass's adapter arguments. Rows that share one adapter run it as the active adapter
        (or with adapters off): peft's per-row `adapter_names` splits every LoRA layer's input by adapter,
        which made a lone request 1.8x slower (bench/serve.py, 1 client)."""
        names = set(per_row)
        if not hasattr(self.model, "peft_config"):
            yield {}
        elif names == {BASE_ADAPTER}:
            with self.model.disable_adapter():
                yield {}
        elif len(names) == 1:
            self.model.base_model.set_adapter(next(iter(names)), inference_mode=True)
            yield {}
        else:
            yield {"adapter_names": per_row}


class _Row:
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
        token = _sample(logits, request.sampling, self.generator)
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
            self._emit(_held_back(text, request.stop_strings))
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


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` without what is not sure yet: a character still being decoded, or an ending that could be
    the start of a stop string (streamed, it could not be taken back)."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - hold]


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
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
