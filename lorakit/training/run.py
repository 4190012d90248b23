"""run(recipe): check the inputs and the output, prepare the data, build the model, train with
transformers' Trainer, and publish the adapter only once it reloads to the trained logits."""

from __future__ import annotations

import dataclasses
import platform
import shutil
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from peft.helpers import disable_input_dtype_casting

from .. import __version__
from ..data.prepare import Prepared, prepare
from ..data.template import is_chat_model, reasoning_block, template_check
from ..errors import Interrupted, LorakitError
from ..log import is_local_main, is_main, say
from ..recipe import Recipe
from ..stages import stage as stage_of
from ..system.allocator import keep_freed_memory
from ..weights.folders import (
    adapter_chain,
    apply_chain,
    base_of,
    is_full_model,
    load_for_inference,
    read_manifest,
    write_adapter,
)
from ..weights.loading import (
    check_causal_lm,
    count_parameters,
    fingerprint,
    for_training,
    load_config,
    load_model,
    load_tokenizer,
    make_trainable,
    release_memory,
    resolve_device,
    resolve_dtype,
    set_stop_tokens,
    unwrap_peft,
)
from ..weights.manifest import Manifest, Parent
from ..weights.outputs import check_disk, check_output, publish, remove_folder, staging
from ..weights.quant import quantization_for
from ..weights.variants import check_recipe as check_variants
from ..weights.variants import (
    described,
    give_every_layer_the_cast_switch,
    save_initial,
    save_options,
    token_ids,
)
from ..weights.verify import logits as probe_logits
from ..weights.verify import probe_ids, require_same_logits
from .attention import restore as restore_attention
from .attention import use_packed as use_packed_attention
from .checkpoints import (
    NonFiniteLoss,
    StopRequest,
    begin,
    check_run_folder,
    drop_incomplete_checkpoints,
    latest_checkpoint,
    output_lock,
    run_folder,
    stop_on_signals,
)
from .distributed import (
    check_ranks_agree,
    check_same_checkpoint,
    check_world,
    local_device,
    lost_process,
    world_size,
)
from .job import Job, RunOptions
from .preference import reference_copy
from .progress import loss_line, plot_loss
from .reference import with_reference
from .sharding import unpartition
from .trainer import build_trainer, micro_batch

__all__ = ["RunOptions", "run"]


def run(recipe: Recipe, options: RunOptions = RunOptions()) -> Path:
    """Train the recipe's adapter (or, with method: full, model) and return its folder.

    Bad settings, a missing model or parent, an output that is not lorakit's to replace, and bad data
    all fail before anything is written. The output is locked for the run; checkpoints go to the run
    folder beside it, and the last one is kept until the adapter is published.
    """
    check_world()
    out = recipe.output_dir
    model_name = _check_inputs(recipe)
    if not is_main():  # other ranks of a distributed run train along; rank 0 checks and owns the output
        job = _job(recipe, options, model_name)
        job.checkpoint = latest_checkpoint(run_folder(out)) if options.resume else None
        result = _run(job)
        if is_local_main() and not job.storage_shared:  # this machine's own checkpoints, kept for a resume until now
            remove_folder(run_folder(out))
        return result
    with output_lock(out):
        check_run_folder(out, recipe.to_dict(), options.resume)
        check_output(out, overwrite=options.overwrite, inputs=_inputs(recipe, options, model_name))
        job = _job(recipe, options, model_name)
        job.run_id, job.checkpoint = begin(out, recipe.to_dict(), {"hash": job.data.data_hash,
                                                                   "rows": job.data.stats["rows"]}, options.resume)
        try:
            result = _run(job)
        except BaseException:
            if latest_checkpoint(run_folder(out)) is None:
                shutil.rmtree(run_folder(out), ignore_errors=True)  # nothing worth resuming
            raise
        remove_folder(run_folder(out))
        return result


def _check_inputs(recipe: Recipe) -> str:
    """The base model's name, once the parent (if any) is known to be a readable adapter and the
    method can build on it: refusals that need no model and no data come first."""
    if recipe.parent and not is_full_model(recipe.parent):
        adapter_chain(recipe.parent)  # the parent and its own parents, every file readable
        if recipe.method == "qlora":
            raise LorakitError("method: qlora cannot build on a parent adapter yet (merging it into a quantized "
                               "base would re-quantize it); merge the parent into a model folder first "
                               "(lorakit merge --adapter PARENT -o FOLDER) and set `model: FOLDER`")
    if recipe.method != "full":
        check_variants(recipe, stage_of(recipe.stage).reference)
    model_name = recipe.model or base_of(recipe.parent)
    check_causal_lm(model_name, recipe.trust_remote_code)
    return model_name


def _inputs(recipe: Recipe, options: RunOptions, model_name: str) -> list[tuple[str, str | Path | None]]:
    """What the run reads, which its output folder must never contain."""
    local_model = model_name if Path(model_name).expanduser().exists() else None
    return [("the recipe", options.recipe_file), *[("the data", s.path) for s in recipe.data.sources],
            ("the eval data", recipe.data.eval_path),
            ("the parent adapter", recipe.parent), ("the base model", local_model)]


def _job(recipe: Recipe, options: RunOptions, model_name: str) -> Job:
    """The tokenizer and the prepared data (bad data fails here, before any weights load), the device,
    the compute dtype and the quantization."""
    tokenizer = load_tokenizer(model_name, recipe.trust_remote_code)
    _check_family(recipe, model_name, tokenizer)
    trainable_ids = token_ids(tokenizer, recipe.lora.trainable_tokens)
    data = prepare(recipe, tokenizer)
    _describe_data(recipe, data)
    device = local_device(resolve_device(recipe.train.device))
    dtype = resolve_dtype(recipe.train.dtype, device)
    _warn_if_too_big(recipe, device)
    return Job(recipe, options, model_name, tokenizer, data, device, dtype, quantization_for(recipe, dtype),
               trainable_token_ids=trainable_ids)


def _check_family(recipe: Recipe, model_name: str, tokenizer) -> None:
    """A family lorakit has not been tested on is refused in one line, or, when the recipe allows it, trained
    once its template passes lorakit's checks (said, with what was checked)."""
    from ..families import FAMILIES, family_of

    config = load_config(model_name, recipe.trust_remote_code)
    if family_of(config) is not None:
        return
    tested = ", ".join(t for f in FAMILIES for t in f.model_types)
    if not recipe.allow_untested_family:
        raise LorakitError(f"{model_name}: model type {config.model_type} is not a family lorakit has been tested on "
                           f"({tested}); set allow_untested_family: true to train it once lorakit's checks of its "
                           f"chat template pass")
    say(f"note: model type {config.model_type} is not tested by lorakit ({tested} are); checked: "
        f"{template_check(tokenizer) if stage_of(recipe.stage).chat else 'nothing family-specific (raw text)'}")


def _warn_if_too_big(recipe: Recipe, device: str) -> None:
    """Say so before loading anything when the planned peak exceeds the device's free memory."""
    from .plan import GIB, free_memory, plan

    expected, free = plan(recipe, device=device)["total"], free_memory(device)
    if expected > free:
        say(f"warning: this run is planned to peak at {expected / GIB:.1f} GiB but {device} has "
            f"{free / GIB:.1f} GiB free; see `lorakit plan` (smaller train.batch_size or data.max_length, "
            f"or train.gradient_checkpointing: true)")


def _run(job: Job) -> Path:
    if job.device == "cpu":
        keep_freed_memory()
    model, base_fingerprint, attention = _build_model(job)
    if stage_of(job.recipe.stage).reference and job.recipe.pref.reference == "precomputed":
        with_reference(job, model, base_fingerprint)
    summary = _train(job, model)
    # Training wrapped forward() in autocast; the probe must see the model as later commands load it.
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    restore_attention(unwrap_peft(model), attention)
    if job.recipe.train.strategy == "ddp" and (checksum := check_ranks_agree(model)):
        say(f"all {world_size()} processes hold the same trained weights (checksum {checksum})")
    if not is_main():
        return job.out
    manifest = _manifest(job, base_fingerprint, summary)
    try:
        return _publish(job, model, manifest, summary)
    except (OSError, KeyboardInterrupt) as exc:
        raise _publish_failed(job, exc) from None


def _publish_failed(job: Job, exc: BaseException) -> LorakitError:
    """What to say when writing the finished adapter failed (a full disk) or was interrupted: nothing
    was published, and the final checkpoint (always written, see trainer.build_trainer) holds the work."""
    last, options = latest_checkpoint(job.run_folder), job.options
    command = f"lorakit train {options.recipe_file or 'RECIPE'} --resume" + (" --overwrite" if options.overwrite else "")
    keep = (f"the trained state is kept in {last}: {command} writes it without training again" if last else
            "no checkpoint was kept, so the run must start again")
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted while writing {job.out}: nothing was published; {keep}")
    what = f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    return LorakitError(f"writing {job.out} failed ({what}); nothing was published; {keep}")


def _build_model(job: Job):
    """The model ready to train: loaded, parent folded in, packed attention, trainable parameters."""
    recipe = job.recipe
    if recipe.trust_remote_code:
        say("trust_remote_code is on: the model's own Python code will run")
    # Full fine-tuning keeps fp32 master weights and trains under autocast; adapters train on a
    # base held in the compute dtype.
    load_dtype = torch.float32 if recipe.method == "full" else job.dtype
    model = load_model(job.model_name, load_dtype, job.device, recipe.trust_remote_code, job.quantization)
    base_fingerprint = fingerprint(model.config, job.tokenizer)
    if recipe.parent:  # the parent chain folded into the base weights, once it is known to fit this base
        model = apply_chain(model, [recipe.parent], base_fingerprint, job.model_name, merge=True)
    attention = use_packed_attention(for_training(model))
    if recipe.method == "full" and stage_of(recipe.stage).reference and recipe.pref.reference == "live":
        job.reference_model = reference_copy(model, job.dtype)
    model = make_trainable(model, recipe, job.quantization is not None, job.trainable_token_ids)
    if recipe.method != "full" and recipe.lora.rewrites_base and is_main():
        save_initial(model, job.run_folder)  # what the adapter is converted against when written
    trainable, total = count_parameters(model)
    precision = job.quantization.describe() if job.quantization else "full precision"
    say(f"{recipe.method} on {job.model_name} ({precision}) on {job.device}, compute "
        f"{str(job.dtype).removeprefix('torch.')}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)")
    t, micro = recipe.train, micro_batch(recipe, job.device)
    say(f"world size {world_size()}: global batch {t.batch_size} rows x {t.grad_accum} accumulation x "
        f"{world_size()} processes = {t.batch_size * t.grad_accum * world_size()} rows per step"
        + (f" ({t.strategy})" if world_size() > 1 else "")
        + (f"; each batch runs as micro-batches of {micro} rows" if micro < t.batch_size else ""))
    check_disk(job.out.parent, _disk_needed(recipe, trainable, total), "checkpoints and the adapter")
    return model, base_fingerprint, attention


def _train(job: Job, model) -> dict:
    stop = StopRequest()
    trainer, progress = build_trainer(model, job, stop)
    check_same_checkpoint(job.checkpoint)
    if job.checkpoint:
        say(f"resuming from {job.checkpoint}")
    if "tensorboard" in job.recipe.train.report_to:
        say(f"TensorBoard: tensorboard --logdir {job.run_folder / 'runs'} (kept in {job.out / 'runs'} afterwards)")
    try:
        # Under autocast, peft would first copy each LoRA input to fp32 (its weights' dtype) and keep the
        # copy for the backward pass: 8 of the 16 GB peak measured on the Qwen2-0.5B shape.
        half = job.dtype != torch.float32 and job.recipe.method != "full"
        give_every_layer_the_cast_switch(model)
        with stop_on_signals(stop), disable_input_dtype_casting(model, active=half):
            trainer.train(resume_from_checkpoint=str(job.checkpoint) if job.checkpoint else None)
        if job.recipe.train.strategy == "zero3" and world_size() > 1 and not stop:
            unpartition(trainer.model_wrapped, model)
    except NonFiniteLoss as exc:
        last = latest_checkpoint(job.run_folder)
        raise NonFiniteLoss(f"{exc}: training stopped before using it. " + (
            f"The last good checkpoint is {last}: resume with --resume and a lower train.lr" if last else
            "No checkpoint was written yet: lower train.lr and start again")) from None
    except RuntimeError as exc:  # a machine of a distributed run died: one line, not the collective's traceback
        raise (lost_process(exc, trainer.state.global_step, latest_checkpoint(job.run_folder)) or exc) from None
    except OSError as exc:  # a checkpoint that did not fit on the disk, or a folder that went away
        drop_incomplete_checkpoints(job.run_folder)
        last = latest_checkpoint(job.run_folder)
        raise LorakitError(f"writing a checkpoint failed at step {trainer.state.global_step} ({exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "") + "); training stopped. " + (
            f"The last complete checkpoint is {last}: make room and continue with --resume" if last else
            "No complete checkpoint was kept: make room and start again")) from None
    finally:
        progress.close()
    if stop:
        raise Interrupted(f"{stop.signal} at step {trainer.state.global_step}: checkpoint written to "
                          f"{latest_checkpoint(job.run_folder)}; continue with the same command and --resume")
    summary = progress.summary()
    if job.data.eval_rows:
        if not progress.evals or progress.evals[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()  # the final figures, unless the schedule just evaluated
        summary.update({k: v for k, v in progress.evals[-1].items() if k != "step"})
    say(loss_line(summary, len(progress.history), trainer.state.global_step, job.recipe.train.logging_steps))
    return {**summary, "history": progress.history, "evals": progress.evals}


def _publish(job: Job, model, manifest: Manifest, summary: dict) -> Path:
    """Write the adapter (or model) to a staging folder, prove it reloads to the trained logits, rename it
    into place."""
    recipe = job.recipe
    history, evals = summary.pop("history"), summary.pop("evals")
    manifest.metrics = summary
    with staging(job.out, full_disk_is_final=False) as folder:  # _publish_failed says what is kept to resume
        if recipe.method == "full":
            model = _deployable(job, model, manifest)
        probe = probe_ids(job.data.rows)
        expected = probe_logits(model, probe)
        write_adapter(folder, job.out, model, job.tokenizer, dataclasses.replace(recipe, model=manifest.base_model),
                      manifest, save_options(recipe, job.run_folder))
        if recipe.method != "full":
            manifest.lora = described(recipe.lora, folder)
        shutil.copy(job.run_folder / "metrics.jsonl", folder / "metrics.jsonl")
        if (job.run_folder / "runs").is_dir():  # TensorBoard's event files (train.report_to)
            shutil.copytree(job.run_folder / "runs", folder / "runs")
        if history:
            plot_loss(history, folder / "loss.png", f"{recipe.name} ({recipe.stage}, {recipe.method})", evals)
        del model
        release_memory()
        manifest.reload_check = _check_reload(job, folder, probe, expected)
        manifest.write(folder)
        return publish(folder, job.out, overwrite=job.options.overwrite)


def _deployable(job: Job, model, manifest: Manifest):
    """A full fine-tune's folder is a model people deploy as it is: the trained weights in the compute
    dtype (said, and recorded), and a chat model that stops at its end-of-turn token, as an export's."""
    if job.dtype != torch.float32:
        model = model.to(job.dtype)
    chat = stage_of(job.recipe.stage).chat or is_chat_model(job.tokenizer)
    end = set_stop_tokens(model, job.tokenizer, chat)
    manifest.dtype = str(job.dtype).removeprefix("torch.")
    say(f"the model's weights are written in {manifest.dtype}" + (f"; it stops at {end}" if end else ""))
    return model


def _disk_needed(recipe: Recipe, trainable: int, total: int) -> int:
    """Bytes for the kept checkpoints (weights + AdamW's two moments per trainable parameter) and the
    output, with a fifth to spare."""
    weights = (total if recipe.method == "full" else trainable) * 4
    per_checkpoint = weights + trainable * 8
    kept = recipe.train.keep_checkpoints if recipe.train.save_steps else 1  # the final one at least
    return int(1.2 * (per_checkpoint * (kept + 1) + weights))


def _check_reload(job: Job, folder: Path, probe, expected) -> dict:
    """Load what was written, as any later command will (fresh base, quantized again for QLoRA, parent
    chain applied), and require the trained model's logits."""
    reloaded = load_for_inference(None, str(folder), job.device, job.dtype).model
    report = require_same_logits(expected, probe_logits(reloaded, probe), job.dtype, f"reloading the new {job.out}")
    say(f"reload check: written weights reproduce the trained logits (max difference {report['max_logit_diff']:.2g})")
    return report


def _describe_data(recipe: Recipe, data: Prepared) -> None:
    s = data.stats
    if s["rows"] is not None:  # a stream's size is known only once it has been read
        kind = stage_of(recipe.stage).data
        what = {"text": "documents", "chat": "conversations", "pairs": f"pairs ({s['examples']:,} answers)",
                "unpaired": "labelled answers (and as many KL sequences)"}[kind]
        say(f"data {recipe.data.label}: {s['examples'] // (1 if kind in ('text', 'chat') else 2):,} {what}"
            f" -> {s['rows']:,} rows of up to {recipe.data.max_length} tokens "
            f"({'packed' if recipe.data.packing else 'not packed'}), {s['tokens']:,} tokens, "
            f"{s['trained_tokens']:,} trained")
        batch = recipe.train.batch_size * recipe.train.grad_accum
        if s["rows"] < batch:
            say(f"warning: the data makes {s['rows']} row(s), fewer than one batch ({batch} = train.batch_size x "
                f"train.grad_accum): every step sees the same rows; lower train.batch_size or add data")
    for note in data.notes:
        say(note)
    if data.system_prompt is not None:
        say(f"system prompt for conversations without one: {data.system_prompt!r}")


def _manifest(job: Job, base_fingerprint: str, summary: dict) -> Manifest:
    import peft
    import transformers

    recipe, local = job.recipe, Path(job.model_name).expanduser()
    parent = None
    if recipe.parent:
        recorded = read_manifest(recipe.parent)
        parent = Parent(str(Path(recipe.parent).resolve()), recorded.name if recorded else None,
                        recorded.stage if recorded else None)
    return Manifest(
        kind="model" if recipe.method == "full" else "adapter", method=recipe.method, stage=recipe.stage,
        name=job.out.name, recipe=recipe.name, base_model=job.model_name,
        base_model_path=str(local.resolve()) if local.exists() else None, base_fingerprint=base_fingerprint,
        parent=parent, system_prompt=job.data.system_prompt,
        reasoning=recipe.data.reasoning if stage_of(recipe.stage).chat and reasoning_block(job.tokenizer) else None,
        data={"path": recipe.data.path, "hash": job.data.data_hash, **job.data.stats},
        quantization=job.quantization, metrics=summary, run_id=job.run_id,
        trained_on={"device": job.device, "dtype": str(job.dtype).removeprefix("torch.")},
        versions={"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__, "python": platform.python_version()},
    )
