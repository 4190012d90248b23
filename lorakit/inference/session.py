"""One base model in memory, several named adapters on it, switched in milliseconds.

Each named entry is one peft adapter. An adapter chain (a CPT parent and the SFT adapter trained on
it) is flattened into one as it is loaded (weights.flatten: the ranks concatenated, exactly
W + dW_parent + dW_child, the merged parent under the child that training saw), so that a batch can
give every row its own entry (peft's per-row adapter_names).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import threading
import warnings
from pathlib import Path

import torch

from ..data.template import Style, style_for, template_system_prompt
from ..errors import LorakitError
from ..weights.flatten import flatten_into
from ..weights.folders import (
    adapter_chain,
    base_of,
    check_base,
    is_full_model,
    read_manifest,
    split_full_model,
    trained_quantization,
)
from ..weights.loading import fingerprint, load_model, load_tokenizer
from ..weights.variants import let_token_rows_mix

BASE = "base"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_entries(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (named after its folder) -> {name: path}."""
    entries = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        check_name(name)
        if name in entries:
            raise LorakitError(f"adapter name {name!r} is given twice")
        entries[name] = path
    return entries


def check_name(name: str) -> None:
    """A name an adapter can be served under (`model` in a request)."""
    if not NAME.match(name) or name in (BASE, "none"):
        raise LorakitError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (not base or none)")


def check_adapter_path(path: str) -> None:
    """A folder that can be taken as an adapter while serving: FileNotFoundError when it is not there,
    LorakitError for a complete model."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such adapter folder (looked at {Path(path).resolve()})")
    if is_full_model(path):
        raise LorakitError(f"{path} is a complete model, not an adapter: serve it with --model")


class Session:
    """The base and its named adapters; `use(name)` switches, `active()` wraps a generation."""

    def __init__(self, model: str | None, entries: dict[str, str], device: str, dtype: torch.dtype, force: bool = False):
        if model is None and not entries:
            raise LorakitError("name a model (--model) or an adapter (--adapter)")
        model, kept = split_full_model(model, list(entries.values()))  # a lone full fine-tune is the model
        entries = {name: path for name, path in entries.items() if path in kept}
        for path in entries.values():
            adapter_chain(path)  # every file readable, before the base is loaded
        self.manifests = {name: read_manifest(path) for name, path in entries.items()}
        quantizations = {str(m.quantization if m else None) for m in self.manifests.values()}
        if len(quantizations) > 1:
            raise LorakitError("these adapters were trained on differently quantized bases; serve them separately")
        self.base_name = model or base_of(next(iter(entries.values())))
        self.tokenizer = load_tokenizer(self.base_name)
        quantization = trained_quantization(self.manifests.values())
        self.model = load_model(self.base_name, dtype, device, quantization=quantization)
        self.quantization = quantization
        self.entries: dict[str, str] = {}
        """name -> the peft adapter serving it; a replaced or removed one stays until no row holds it."""
        self.base_fingerprint = fingerprint(self.model.config, self.tokenizer)
        self._ids, self._lock = itertools.count(), threading.Lock()
        self._held: collections.Counter[str] = collections.Counter()
        self._retired: set[str] = set()
        for name, path in entries.items():
            check_base(path, self.manifests[name], self.base_fingerprint, self.base_name, force)
            self.entries[name] = self._attach(path)
        self.current: str | None = next(iter(self.entries), None)
        if self.current:
            self.use(self.current)

    def _attach(self, path: str) -> str:
        """Load the adapter (its chain flattened) under a new peft name; returns that name."""
        ident = f"e{next(self._ids)}"
        try:
            self.model = flatten_into(self.model, adapter_chain(path), ident)
        except Exception:
            if ident in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(ident)  # nothing half-loaded stays
            raise
        let_token_rows_mix(self.model)
        self.model.eval()
        return ident

    # --- adapters that come and go while serving (live.py): run on the engine's thread, between forward passes ---

    def check_new(self, path: str) -> None:
        """Refuse, before anything loads, an adapter this session cannot take (LorakitError, or FileNotFoundError
        for a path that is not there)."""
        check_adapter_path(path)
        adapter_chain(path)  # every file readable
        manifest = read_manifest(path)
        check_base(path, manifest, self.base_fingerprint, self.base_name, force=False)
        if (manifest.quantization if manifest else None) != self.quantization:
            raise LorakitError(f"{path} was trained on a differently quantized base than the one served")

    def load(self, name: str, path: str) -> None:
        """Take `path` as `name` (replacing what `name` served: rows in flight keep the old weights)."""
        ident = self._attach(path)
        with self._lock:
            old = self.entries.get(name)
            self.entries[name], self.manifests[name] = ident, read_manifest(path)
            if old is not None:
                self._retired.add(old)

    def unload(self, name: str) -> None:
        """Stop serving `name` (new requests get a 404); rows in flight finish with it."""
        with self._lock:
            if name not in self.entries:
                raise KeyError(name)
            self._retired.add(self.entries.pop(name))
            self.manifests.pop(name, None)
            if self.current == name:
                self.current = None

    def hold(self, name: str) -> str:
        """The peft adapter for a new row of `name`, held until release() (KeyError: not served)."""
        from .engine import BASE_ADAPTER

        if name in (BASE, "none"):
            return BASE_ADAPTER
        with self._lock:
            ident = self.entries[name]
            self._held[ident] += 1
            return ident

    def release(self, ident: str) -> None:
        with self._lock:
            self._held[ident] -= 1

    def collect(self):
        """Delete the replaced and removed adapters no row holds any more; returns the model to generate with (the
        engine calls this between forward passes). With the last adapter gone, the bare base is served again."""
        with self._lock:
            done = [ident for ident in self._retired if self._held[ident] <= 0]
            self._retired.difference_update(done)
        for ident in done:
            with warnings.catch_warnings():  # "Adapter e0 was active which is now deleted": each batch sets its own
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(ident)
        if done and not self.model.peft_config:  # peft keeps pointing at a deleted active adapter otherwise
            self.model = self.model.unload()
        return self.model

    def adapter_of(self, name: str) -> str:
        """The peft adapter serving `name` in a batch (engine.BASE_ADAPTER for the bare base)."""
        from .engine import BASE_ADAPTER

        return BASE_ADAPTER if name in (BASE, "none") else self.entries[name]

    @property
    def names(self) -> list[str]:
        return [BASE] + list(self.entries)

    def use(self, name: str | None) -> None:
        """Switch to a named adapter, or to the bare base (None, "base" or "none")."""
        if name in (None, BASE, "none"):
            self.current = None
            return
        if name not in self.entries:
            raise LorakitError(f"no adapter named {name!r}; loaded: {', '.join(self.names)}")
        self.model.base_model.set_adapter(self.entries[name], inference_mode=True)
        self.current = name

    @contextlib.contextmanager
    def active(self):
        """The model as the current selection sees it (adapters off for the bare base)."""
        if self.current is None and self.entries:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self.entries:  # a serving engine leaves the layers as its last pass needed them, maybe off
                self.model.base_model.enable_adapter_layers()
            yield self.model

    def system_prompt(self, name: str | None = None) -> str | None:
        """The system prompt adapter `name` (default: the current one; "base": none) was trained with,
        else the template's own."""
        manifest = self.manifests.get(self.current if name is None else name)
        if manifest and manifest.system_prompt is not None:
            return manifest.system_prompt
        return template_system_prompt(self.tokenizer)

    def style(self, name: str | None = None) -> Style:
        """How adapter `name` (default: the current one) renders conversations: its data.reasoning."""
        manifest = self.manifests.get(self.current if name is None else name)
        return style_for(self.tokenizer, (manifest.reasoning if manifest else None) or "keep")
