"""pref.reference: precomputed. The reference's log-probability of every answer, computed once before training
(the adapter switched off, the parent chain applied) and kept in the data cache entry beside the rows, so a
later run on the same data and model reads it; training then runs one forward pass per step instead of two.

The file is named by what the reference is (the base model, the parent chain, quantization, dtype); since a
local model folder may change under the same name, the first row is recomputed on every reuse and must agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from ..data.blocks import Collator
from ..errors import LorakitError
from ..log import is_main, say
from ..weights.folders import read_manifest
from .loss import install, output_head, remove
from .preference import answer_logps


def with_reference(job, model, base_fingerprint: str) -> None:
    """Give the job's rows (and eval rows) a `reference` column: each answer's reference log-probability."""
    if job.data.location is None:
        raise LorakitError("pref.reference: precomputed keeps the log-probabilities in the data cache; this data has "
                           "no cache entry")
    key = _key(job, base_fingerprint)
    for name in ("rows", "eval_rows"):
        rows = getattr(job.data, name)
        if rows is None:
            continue
        path = job.data.location / f"reference-{name}-{key}.json"
        values = _read(path)
        if values is not None and not _agrees(values[0], _compute(job, model, rows.select([0]), quiet=True)[0]):
            say(f"the reference log-probabilities kept in {path} no longer match the model; computing them again")
            values = None
        if values is None:
            values = _compute(job, model, rows)
            if is_main():
                _write(path, values)
        else:
            say(f"reference log-probabilities read from {path} (computed by an earlier run)")
        setattr(job.data, name, rows.add_column("reference", values))


def _key(job, base_fingerprint: str) -> str:
    recipe = job.recipe
    chain = []
    if recipe.parent:
        manifest = read_manifest(recipe.parent)
        chain = [str(Path(recipe.parent).resolve()), manifest.run_id if manifest else None]
    identity = [job.model_name, base_fingerprint, chain, job.quantization.describe() if job.quantization else None,
                str(job.dtype), job.device.split(":")[0]]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


@torch.no_grad()
def _compute(job, model, rows, quiet: bool = False) -> list[list[float]]:
    """Per row, the reference log-probability of each of its answers (in the row's order)."""
    from tqdm.auto import tqdm

    from .trainer import micro_batch

    collate, size, found = Collator(job.tokenizer.pad_token_id), micro_batch(job.recipe, job.device), []
    head = output_head(model)
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    half = job.dtype != torch.float32
    was_training = model.training
    model.eval()
    install(model)
    try:
        with adapter_off, torch.autocast(job.device.split(":")[0], dtype=job.dtype, enabled=half):
            for start in tqdm(range(0, len(rows), size), desc="reference log-probabilities", unit=" batches",
                              disable=quiet or not is_main()):
                batch = rows.select(range(start, min(start + size, len(rows))))
                inputs = {k: v.to(job.device) for k, v in collate(list(batch)).items()}
                logps = answer_logps(model, inputs, head)[0].tolist()
                for r in batch:
                    found.append(logps[:len(r["sides"])])
                    logps = logps[len(r["sides"]):]
    finally:
        remove(model)
        model.train(was_training)
    return found


def _agrees(kept: list[float], now: list[float]) -> bool:
    return len(kept) == len(now) and all(abs(a - b) <= 1e-2 + 1e-3 * abs(b) for a, b in zip(kept, now))


def _read(path: Path) -> list[list[float]] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, values: list[list[float]]) -> None:
    """Written whole or not at all (a rename), so a killed run never leaves half a file to be read."""
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(values), encoding="utf-8")
    os.replace(partial, path)
