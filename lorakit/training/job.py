"""One training run as it goes: what was asked (recipe and options), what was loaded (tokenizer,
data), where it runs, and where it resumes from. Built by run.py, read by the trainer set-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.prepare import Prepared
from ..recipe import Recipe
from ..weights.manifest import Quantization
from .checkpoints import run_folder


@dataclass(frozen=True)
class RunOptions:
    """How `lorakit train` was asked to run, beyond the recipe."""

    resume: bool = False
    """Continue the interrupted run from its latest checkpoint."""
    overwrite: bool = False
    """Replace a finished adapter (only one lorakit wrote, holding nothing else) at the output."""
    recipe_file: Path | None = None
    """The recipe's file: never inside the output, and named in the messages that say how to resume."""


@dataclass
class Job:
    recipe: Recipe
    options: RunOptions
    model_name: str
    """The base model: the recipe's, or its parent adapter's."""
    tokenizer: Any
    data: Prepared
    device: str
    dtype: torch.dtype
    quantization: Quantization | None = None
    checkpoint: Path | None = None
    storage_shared: bool = True
    """Whether every machine of the run sees the run folder on one filesystem (distributed.storage_shared)."""
    """Where --resume continues from; None for a fresh run."""
    run_id: str = ""
    reference_model: Any = None
    """Preference stages with method full: the frozen copy the policy is compared with."""
    trainable_token_ids: list[int] = field(default_factory=list)
    """lora.trainable_tokens as ids of the tokenizer's vocabulary."""

    @property
    def out(self) -> Path:
        return self.recipe.output_dir

    @property
    def run_folder(self) -> Path:
        return run_folder(self.out)
