"""transformers' Trainer, set up the way lorakit trains: our rows and collator, our progress and metrics."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ..data.blocks import Collator
from ..recipe import Recipe
from ..stages import stage as stage_of
from .checkpoints import NonFiniteLoss, StopRequest
from .distributed import check_engine, storage_shared, trainer_options
from .job import Job
from .loss import install, make_loss, output_head, remove
from .preference import PreferenceStep
from .progress import ProgressCallback


class _Trainer(Trainer):
    """Evaluation batches get a collator of their own, so the count of trained tokens stays exact; a preference
    stage's loss is its own (preference.PreferenceStep), with its metrics logged beside the loss."""

    def __init__(self, *args, eval_collator=None, preference: PreferenceStep | None = None,
                 loraplus_lr_ratio: float = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.preference = preference
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def create_optimizer(self, model=None):
        """train.loraplus_lr_ratio: peft's LoRA+ optimizer (B and DoRA magnitudes at lr x ratio), built from the
        optimizer the arguments name (AdamW, its betas and eps), as the Trainer would build its own."""
        if self.loraplus_lr_ratio and self.optimizer is None:
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = create_loraplus_optimizer(self.model if model is None else model, optimizer_cls,
                                                       loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                       loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With the chunked loss, the output head steps aside for the forward pass only, so that
        checkpoints, evaluation outside this method and saving all see the model as it is."""
        if self.preference is not None:
            loss = self.preference.loss(self, model, inputs)
            return (loss, {}) if return_outputs else loss  # {}: no logits to hand the evaluation loop
        if self.compute_loss_func is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        install(self.model)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            remove(self.model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stop at the first NaN or infinite loss, before an optimizer step can use its gradients."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"the loss became {loss.item()} at step {self.state.global_step + 1}")
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.preference is not None:
            logs = {**logs, **self.preference.logged("eval" if "eval_loss" in logs else "train")}
        super().log(logs, *args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        training, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training


CPU_MICRO_BATCH_TOKENS = 1024
FINAL_ONLY = 2**62  # save_steps that no run reaches: only the final checkpoint


def micro_batch(recipe: Recipe, device: str) -> int:
    """Rows per forward pass. On a CPU, throughput peaks near 1024 tokens at once (measured on the
    Qwen2-0.5B shape: batch 4 x 1024 ran at 151 tok/s and 9.2 GiB, 4 micro-batches of 1 at 186 tok/s and
    5.8 GiB), so larger batches are split into micro-batches whose gradients are accumulated: the same
    optimizer steps, less memory. On a GPU the whole batch runs at once unless the recipe says otherwise."""
    t = recipe.train
    if t.micro_batch_size:
        return t.micro_batch_size
    if device.startswith("cuda"):
        return t.batch_size
    # a row of one pair (unpacked) holds up to two sequences of max_length tokens
    pairs = stage_of(recipe.stage).preference and not recipe.data.packing
    row_tokens = recipe.data.max_length * (2 if pairs else 1)
    rows = max(1, CPU_MICRO_BATCH_TOKENS // row_tokens)
    return max(d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0 and d <= rows)


def _dataset(rows):
    """Prepared rows as the Trainer takes them: the memory-mapped Dataset (or stream) as it is, a list
    (small data made in memory) as a Dataset."""
    from datasets import Dataset

    return Dataset.from_list(rows) if isinstance(rows, list) else rows


def build_trainer(model, job: Job, stop: StopRequest) -> tuple[Trainer, ProgressCallback]:
    """The Trainer writing checkpoints (and metrics.jsonl) into the run folder."""
    recipe, device, dtype, run_dir = job.recipe, job.device, job.dtype, job.run_folder
    rows, eval_rows = job.data.rows, job.data.eval_rows
    t = recipe.train
    micro = micro_batch(recipe, device)
    evaluate = "no" if not eval_rows else ("steps" if t.eval_steps else "epoch")
    args = TrainingArguments(
        output_dir=str(run_dir), num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.lr, per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=t.grad_accum * t.batch_size // micro, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
        activation_checkpointing=t.gradient_checkpointing, logging_steps=t.logging_steps,
        eval_strategy=evaluate, eval_steps=t.eval_steps or None, prediction_loss_only=True,
        # Always "steps": the Trainer then also checkpoints the final step, which is kept until the adapter
        # is published, so a full disk or a kill while writing it loses no training (save_steps 0: only that one).
        save_strategy="steps", save_steps=t.save_steps or FINAL_ONLY,
        save_total_limit=t.keep_checkpoints, logging_nan_inf_filter=False,
        report_to=t.report_to, disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=device.startswith("cuda"), **trainer_options(t.strategy, device, model),
    )
    args.device  # noqa: B018  (sets up the process group, which storage_shared talks through)
    job.storage_shared = storage_shared(run_dir.parent)
    args.save_on_each_node = not job.storage_shared
    collator = Collator(job.tokenizer.pad_token_id)
    stage = stage_of(recipe.stage)
    progress = ProgressCallback(run_dir / "metrics.jsonl", collator, stop, stage.preference)
    chunked = t.strategy == "ddp"  # FSDP/DeepSpeed shard the head's weight: leave the loss to the model
    preference = PreferenceStep(stage, recipe.pref, chunked, job.reference_model) if stage.preference else None
    trainer = _Trainer(model=model, args=args, train_dataset=_dataset(rows), preference=preference,
                       compute_loss_func=make_loss(output_head(model)) if chunked and not preference else None,
                       eval_dataset=_dataset(eval_rows) if eval_rows else None,
                       data_collator=collator, eval_collator=Collator(job.tokenizer.pad_token_id), callbacks=[progress],
                       loraplus_lr_ratio=t.loraplus_lr_ratio)
    trainer.remove_callback(PrinterCallback)  # our bar and metrics.jsonl replace its raw dict prints
    check_engine(trainer, t.strategy)
    return trainer, progress
