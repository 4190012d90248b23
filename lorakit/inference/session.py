"""One base model in memory, several named adapters on it, switched in milliseconds.

Each named entry is one peft adapter. An adapter chain (a CPT parent and the SFT adapter trained on
it) is flattened into one as it is loaded (weights.flatten: the ranks concatenated, exactly
W + dW_parent + dW_child, the merged parent under the child that training saw), so that a batch can
give every row its own entry (peft's per-row adapter_names).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from ..data.template import Style, style_for, template_system_prompt
from ..errors import LorakitError
from ..weights.flatten import flatten_into
from ..weights.folders import (
    adapter_chain,
    base_of,
    check_base,
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
        if not NAME.match(name) or name in (BASE, "none"):
            raise LorakitError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (not base or none)")
        if name in entries:
            raise LorakitError(f"adapter name {name!r} is given twice")
        entries[name] = path
    return entries


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
        self.entries: dict[str, str] = {}
        base_fingerprint = fingerprint(self.model.config, self.tokenizer)
        for index, (name, path) in enumerate(entries.items()):
            check_base(path, self.manifests[name], base_fingerprint, self.base_name, force)
            self.entries[name] = f"e{index}"
            self.model = flatten_into(self.model, adapter_chain(path), self.entries[name])
        let_token_rows_mix(self.model)
        self.model.eval()
        self.current: str | None = next(iter(self.entries), None)
        if self.current:
            self.use(self.current)

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
