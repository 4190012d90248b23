"""Many requests generated together, continuously batched: one forward pass gives every running row its next
token, each row with its own adapter (peft's per-row `adapter_names`), its own sampling, stop tokens and strings,
its own stream and its own cancellation (a client that goes away stops its row, not the batch).

Rows join and leave the running batch at token boundaries, as vLLM's scheduler does it: a request that arrives
while others generate has its prompt read (prefilled) at once and then takes its tokens in the same forward passes
as theirs; a row that ends leaves at once and its client gets the answer. A short request never waits for a long
one's length. The rows' key-value caches sit side by side, left-padded to the longest history.

Written here because transformers' generate() takes one sampling setting and one stop rule for a whole batch and
cannot stream, cancel, admit or release rows; vLLM (`lorakit serve --engine vllm`), with paged attention, is the
engine for production traffic.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .generate import Generation, Sampling
from .rows import Row

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
    """A thread that generates what is submitted on one model, continuously batched. While it serves, it owns the
    model's active adapter (rows of one adapter set it); nothing else generates on that model."""

    def __init__(self, model, tokenizer, max_batch: int = 16, gather_s: float = 0.005,
                 between: Callable[[], Any] | None = None):
        self.model, self.tokenizer, self.max_batch, self.gather_s = model, tokenizer, max_batch, gather_s
        self.between = between
        """Called on the engine's thread between forward passes, after the tasks: returns the model to generate with
        (the session's, which drops the adapters no row holds and may have taken new ones)."""
        self.pending: queue.Queue[Request | None] = queue.Queue()  # None: a task is waiting, wake up
        self.tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.running: dict[str, Running] = {}
        """The batches in flight: "" for the rows that share forward passes, an adapter's name for one that peft
        cannot mix with others (DoRA), whose rows run beside them in passes of their own."""
        self.stats = {"passes": 0, "rows": 0, "largest": 0, "cancelled": 0, "prompt_tokens": 0,
                      "completion_tokens": 0, "queue_wait_s": 0.0}
        """Forward passes run, rows admitted, the most rows generating at once, rows stopped because their client
        left, tokens read and generated, and the seconds rows waited between their submission and their prefill."""
        self._probe: tuple[tuple, Any] = ((), None)
        """(the model's layout, one of its LoRA layers): where _switch reads whether the adapter layers are on."""
        threading.Thread(target=self._serve, daemon=True, name="lorakit-engine").start()

    def submit(self, request: Request) -> Future:
        self.pending.put(request)
        return request.done

    def call(self, task: Callable[[], Any]) -> Future:
        """Run `task` on the engine's thread between forward passes, where nothing generates (loading or replacing
        an adapter changes the model's layers); resolves to its result."""
        done: Future = Future()
        self.tasks.put((task, done))
        self.pending.put(None)
        return done

    @property
    def generating(self) -> int:
        """Rows generating now."""
        return sum(len(batch.rows) for batch in list(self.running.values()))

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
            arrived = self._arrivals(wait=not self.running)
            self._run_tasks()
            self._admit(arrived)
            for key, batch in list(self.running.items()):
                self._pass(batch)
                if not batch.rows:
                    del self.running[key]

    def _arrivals(self, wait: bool) -> list[Request]:
        """What was submitted, up to the room left in the batch. An idle engine waits for a first request and
        gathers what arrives with it (no gap over gather_s); a busy one takes what is there, between passes."""
        room = self.max_batch - self.generating
        arrived: list[Request] = []
        if wait:
            first = self.pending.get()
            if first is None:
                return []
            arrived.append(first)
        while len(arrived) < room:
            try:
                item = self.pending.get(timeout=self.gather_s) if wait else self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                arrived.append(item)
        return arrived

    def _admit(self, arrived: list[Request]) -> None:
        """Prefill the arrived requests (by group) and let their rows join the running batches."""
        if not arrived:  # the usual case between two tokens: nothing to do on this hot path
            return
        from ..weights.variants import alone_in_a_batch

        alone = alone_in_a_batch(self.model)
        groups: dict[str, list[Row]] = {}
        now = time.monotonic()
        for r in arrived:
            if r.cancel.is_set():
                r.done.set_result(Generation("", len(r.prompt_ids), 0, "cancelled"))
                self.stats["cancelled"] += 1
                continue
            self.stats["queue_wait_s"] += now - r.submitted
            groups.setdefault(r.adapter if r.adapter in alone else "", []).append(Row(r, self.tokenizer))
        for key, rows in groups.items():
            self.stats["rows"] += len(rows)
            batch = Running(rows, self.tokenizer.pad_token_id, next(self.model.parameters()).device)
            self._pass(batch)
            if not batch.rows:
                continue
            if key in self.running:
                self.running[key].join(batch)
            else:
                self.running[key] = batch
        self.stats["largest"] = max(self.stats["largest"], self.generating)

    def _pass(self, batch: Running) -> None:
        """One forward pass of `batch`; the rows that finished leave it and get their answers."""
        self.stats["passes"] += 1
        try:
            with torch.no_grad():
                batch.step(self.model, self._adapters([row.request.adapter for row in batch.rows]))
        except Exception as exc:  # noqa: BLE001  (each of its requests gets the error, the thread lives on)
            for row in batch.rows:
                if not row.request.done.done():
                    row.request.done.set_exception(exc)
            batch.rows = []
            return
        for row in batch.leave():  # counted before the answer goes out: a client that reads /metrics next sees it
            self.stats["cancelled"] += row.reason == "cancelled"
            self.stats["prompt_tokens"] += len(row.request.prompt_ids)
            self.stats["completion_tokens"] += len(row.tokens)
            row.finish()

    def _adapters(self, per_row: list[str]) -> dict:
        """The model set up for the forward pass, and the pass's adapter arguments. Rows that share one adapter run
        it as the active adapter (or with adapters off): peft's per-row `adapter_names` splits every LoRA layer's
        input by adapter, which made a lone request 1.8x slower (bench/serve.py, 1 client)."""
        names = set(per_row)
        if not hasattr(self.model, "peft_config"):
            return {}
        if names == {BASE_ADAPTER}:
            self._switch(on=False)
            return {}
        if len(names) == 1:
            self._switch(on=True, active=next(iter(names)))
            return {}
        self._switch(on=True)
        return {"adapter_names": per_row}

    def _switch(self, on: bool, active: str | None = None) -> None:
        """Adapter layers on or off, and the active adapter, changed only where the model is not so already: peft
        walks every module to switch (0.4 ms to set an adapter, 1.7 ms to enter and leave disable_adapter() on the
        bench's 2-layer model, against a few ms for its forward pass), and most passes continue the last one. The
        state is read from the model (its active adapter, one LoRA layer's switch), not remembered: whatever else
        set it (peft's PeftModel.active_adapter can be stale; the layer's is what its forward uses), this pass runs
        as asked."""
        layout = (id(self.model), tuple(self.model.peft_config))
        if self._probe[0] != layout:  # adapters loaded or deleted, or another model: find a layer again
            layer = next((m for m in self.model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")),
                         None)
            self._probe = (layout, layer)
        layer = self._probe[1]
        if layer is None or layer.disable_adapters == on:
            (self.model.base_model.enable_adapter_layers if on else self.model.base_model.disable_adapter_layers)()
        if active is not None and (layer is None or layer.active_adapters != [active]):
            self.model.base_model.set_adapter(active, inference_mode=True)


class Running:
    """Rows generating together: their next inputs and their key-value cache, side by side, each row's history
    left-padded to the longest (the attention mask hides the padding; positions count each row's own tokens)."""

    def __init__(self, rows: list[Row], pad: int, device):
        self.rows = rows
        width = max(len(row.request.prompt_ids) for row in rows)
        self.input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        self.attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            self.input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            self.attention[i, width - len(prompt):] = 1
        self.input_ids, self.attention = self.input_ids.to(device), self.attention.to(device)
        self.positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def step(self, model, extra: dict) -> None:
        """One forward pass: every row's next token chosen (the first one, for rows just prefilled)."""
        out = model(input_ids=self.input_ids, attention_mask=self.attention, position_ids=self.positions,
                    past_key_values=self.cache, use_cache=True, logits_to_keep=1, **extra)
        chosen = [row.choose_or_fail(out.logits[i, -1].float()) for i, row in enumerate(self.rows)]
        self.input_ids = torch.tensor([[token] for token in chosen], device=self.input_ids.device)
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1

    def leave(self) -> list[Row]:
        """Take the finished rows out (their cache rows dropped, and the padding no remaining row needs);
        returns them."""
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        gone = [row for row in self.rows if row.finished]
        if not gone:
            return []
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return gone
        index = torch.tensor(keep, device=self.attention.device)
        self.input_ids, self.positions = self.input_ids[index], self.positions[index]
        self.attention = self.attention[index]
        first = int(self.attention.any(0).int().argmax())  # the first column a remaining row attends to
        self.attention = self.attention[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        return gone

    def join(self, other: Running) -> None:
        """Add `other`'s rows (prefilled, at the same token boundary): the shorter history is left-padded."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_padded(mine.keys, width - 1, 2), _padded(theirs.keys, width - 1, 2)])
            mine.values = torch.cat([_padded(mine.values, width - 1, 2), _padded(theirs.values, width - 1, 2)])
        self.attention = torch.cat([_padded(self.attention, width, 1), _padded(other.attention, width, 1)])
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows += other.rows


def _padded(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim`, up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
