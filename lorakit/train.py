"""run(recipe): check the output and data, build the model, train with transformers' Trainer, publish."""

from __future__ import annotations

import dataclasses
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from peft.helpers import disable_input_dtype_casting

from . import __version__
from .adapters import (adapter_chain, apply_chain, base_of, is_full_model, load_for_inference, read_manifest,
                       write_adapter, write_manifest)
from .allocator import keep_freed_memory
from .data.prepare import Prepared, prepare
from .attention import restore as restore_attention
from .attention import use_packed as use_packed_attention
from .distributed import check_ranks_agree, check_world, local_device, world_size
from .errors import Interrupted, LorakitError
from .modeling import (check_causal_lm, count_parameters, fingerprint, for_training, load_model,
                       load_tokenizer, make_trainable, release_memory, resolve_device, resolve_dtype, set_stop_tokens)
from .log import is_main, say
from .outputs import check_output, publish, remove_folder, staging
from .progress import plot_loss
from .quant import describe as describe_quant
from .runs import (NonFiniteLoss, begin, check_disk, check_run_folder, drop_incomplete_checkpoints,
                   latest_checkpoint, output_lock, run_folder, stop_on_signals)
from .trainer import build_trainer, micro_batch
from .verify import compare, probe_ids
from .verify import logits as probe_logits


@dataclass(frozen=True)
class RunOptions:
    """How `lorakit train` was asked to run, beyond the recipe."""

    resume: bool = False
    """Continue the interrupted run from its latest checkpoint."""
    overwrite: bool = False
    """Replace a finished adapter (only one lorakit wrote, holding nothing else) at the output."""
    recipe_file: Path | None = None
    """The recipe's file: never inside the output, and named in the messages that say how to resume."""


def run(recipe, options: RunOptions = RunOptions()) -> Path:
    """Train the recipe's adapter (or, with method: full, model) and return its folder.

    Bad settings, a missing model or parent, an output that is not lorakit's to replace, and bad data
    all fail before anything is written. The output is locked for the run; checkpoints go to the run
    folder beside it, and the last one is kept until the adapter is published.
    """
    check_world()
    out = recipe.output_dir
    model_name = _check_inputs(recipe)
    if not is_main():  # other ranks of a distributed run train along; rank 0 checks and owns the output
        tokenizer, data = _load_data(recipe, model_name)
        checkpoint = latest_checkpoint(run_folder(out)) if options.resume else None
        return _run(recipe, model_name, tokenizer, data, checkpoint, options, run_id="")
    with output_lock(out):
        check_run_folder(out, recipe.to_dict(), options.resume)
        check_output(out, overwrite=options.overwrite, inputs=_inputs(recipe, options, model_name))
        tokenizer, data = _load_data(recipe, model_name)
        run_id, checkpoint = begin(out, recipe.to_dict(), {"hash": data.data_hash, "rows": len(data.rows)},
                                   options.resume)
        try:
            result = _run(recipe, model_name, tokenizer, data, checkpoint, options, run_id)
        except BaseException:
            if latest_checkpoint(run_folder(out)) is None:
                shutil.rmtree(run_folder(out), ignore_errors=True)  # nothing worth resuming
            raise
        remove_folder(run_folder(out))
        return result


def _check_inputs(recipe) -> str:
    """The base model's name, once the parent (if any) is known to be a readable adapter and the
    method can build on it: refusals that need no model and no data come first."""
    if recipe.parent and not is_full_model(recipe.parent):
        adapter_chain(recipe.parent)  # the parent and its own parents, every file readable
        if recipe.method == "qlora":
            raise LorakitError("method: qlora cannot build on a parent adapter yet (merging it into a quantized "
                               "base would re-quantize it); merge the parent into a model folder first "
                               "(lorakit merge --adapter PARENT -o FOLDER) and set `model: FOLDER`")
    model_name = recipe.model or base_of(recipe.parent)
    check_causal_lm(model_name, recipe.trust_remote_code)
    return model_name


def _inputs(recipe, options: RunOptions, model_name: str) -> list[tuple[str, str | Path | None]]:
    """What the run reads, which its output folder must never contain."""
    local_model = model_name if Path(model_name).expanduser().exists() else None
    return [("the recipe", options.recipe_file), ("the data", recipe.data.path), ("the eval data", recipe.data.eval_path),
            ("the parent adapter", recipe.parent), ("the base model", local_model)]


def _load_data(recipe, model_name: str):
    tokenizer = load_tokenizer(model_name, recipe.trust_remote_code)
    data = prepare(recipe, tokenizer)
    _describe_data(recipe, data)
    _warn_if_too_big(recipe)
    return tokenizer, data


def _warn_if_too_big(recipe) -> None:
    """Say so before loading anything when the planned peak exceeds the device's free memory."""
    from .plan import GIB, free_memory, plan

    device = local_device(resolve_device(recipe.train.device))
    expected, free = plan(recipe, device=device)["total"], free_memory(device)
    if expected > free:
        say(f"warning: this run is planned to peak at {expected / GIB:.1f} GiB but {device} has "
            f"{free / GIB:.1f} GiB free; see `lorakit plan` (smaller train.batch_size or data.max_length, "
            f"or train.gradient_checkpointing: true)")


def _run(recipe, model_name: str, tokenizer, data: Prepared, checkpoint: Path | None, options: RunOptions,
         run_id: str) -> Path:
    device = local_device(resolve_device(recipe.train.device))
    dtype = resolve_dtype(recipe.train.dtype, device)
    quantization = _quantization(recipe, dtype)
    if device == "cpu":
        keep_freed_memory()
    model, base_fingerprint, attention = _build_model(recipe, model_name, tokenizer, device, dtype, quantization)
    summary = _train(model, tokenizer, data, recipe, recipe.output_dir, device, dtype, checkpoint)
    # Training wrapped forward() in autocast; the probe must see the model as later commands load it.
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    restore_attention(model.get_base_model() if hasattr(model, "get_base_model") else model, attention)
    if recipe.train.strategy == "ddp" and (checksum := check_ranks_agree(model)):
        say(f"all {world_size()} processes hold the same trained weights (checksum {checksum})")
    if not is_main():
        return recipe.output_dir
    manifest = _manifest(recipe, model_name, base_fingerprint, data, summary, device, dtype, quantization)
    manifest["run_id"] = run_id
    try:
        return _publish(recipe, model, tokenizer, data, manifest, summary, device, dtype, options)
    except (OSError, KeyboardInterrupt) as exc:
        raise _publish_failed(recipe, options, exc) from None


def _publish_failed(recipe, options: RunOptions, exc: BaseException) -> LorakitError:
    """What to say when writing the finished adapter failed (a full disk) or was interrupted: nothing
    was published, and the final checkpoint (always written, see trainer.build_trainer) holds the work."""
    out, last = recipe.output_dir, latest_checkpoint(run_folder(recipe.output_dir))
    command = f"lorakit train {options.recipe_file or 'RECIPE'} --resume" + (" --overwrite" if options.overwrite else "")
    keep = (f"the trained state is kept in {last}: {command} writes it without training again" if last else
            "no checkpoint was kept, so the run must start again")
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted while writing {out}: nothing was published; {keep}")
    what = f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    return LorakitError(f"writing {out} failed ({what}); nothing was published; {keep}")


def _build_model(recipe, model_name: str, tokenizer, device: str, dtype, quantization):
    """The model ready to train: loaded, parent folded in, packed attention, trainable parameters."""
    if recipe.trust_remote_code:
        say("trust_remote_code is on: the model's own Python code will run")
    # Full fine-tuning keeps fp32 master weights and trains under autocast; adapters train on a
    # base held in the compute dtype.
    load_dtype = torch.float32 if recipe.method == "full" else dtype
    model = load_model(model_name, load_dtype, device, recipe.trust_remote_code, quantization)
    base_fingerprint = fingerprint(model.config, tokenizer)
    model = _apply_parent(model, base_fingerprint, recipe.parent, model_name)
    attention = use_packed_attention(for_training(model))
    model = make_trainable(model, recipe, quantization is not None)
    trainable, total = count_parameters(model)
    say(f"{recipe.method} on {model_name} ({_quant_text(quantization)}) on {device}, compute "
        f"{str(dtype).removeprefix('torch.')}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)")
    t, micro = recipe.train, micro_batch(recipe, device)
    say(f"world size {world_size()}: global batch {t.batch_size} rows x {t.grad_accum} accumulation x "
        f"{world_size()} processes = {t.batch_size * t.grad_accum * world_size()} rows per step"
        + (f" ({t.strategy})" if world_size() > 1 else "")
        + (f"; each batch runs as micro-batches of {micro} rows" if micro < t.batch_size else ""))
    check_disk(recipe.output_dir.parent, _disk_needed(recipe, trainable, total), "checkpoints and the adapter")
    return model, base_fingerprint, attention


def _publish(recipe, model, tokenizer, data: Prepared, manifest: dict, summary: dict, device: str, dtype,
             options: RunOptions) -> Path:
    """Write the adapter (or model) to a staging folder, prove it reloads to the trained logits, rename it
    into place."""
    out = recipe.output_dir
    history, evals = summary.pop("history"), summary.pop("evals")
    manifest["metrics"] = summary
    with staging(out) as folder:
        if recipe.method == "full":
            model = _deployable(model, tokenizer, recipe, dtype, manifest)
        probe = probe_ids(data.rows)
        expected = probe_logits(model, probe)
        write_adapter(folder, out, model, tokenizer, dataclasses.replace(recipe, model=manifest["base_model"]),
                      manifest)
        shutil.copy(run_folder(out) / "metrics.jsonl", folder / "metrics.jsonl")
        if history:
            plot_loss(history, folder / "loss.png", f"{recipe.name} ({recipe.stage}, {recipe.method})", evals)
        del model
        release_memory()
        manifest["reload_check"] = _check_reload(folder, out, probe, expected, device, dtype)
        write_manifest(folder, manifest)
        return publish(folder, out, overwrite=options.overwrite)


def _deployable(model, tokenizer, recipe, dtype, manifest: dict):
    """A full fine-tune's folder is a model people deploy as it is: the trained weights in the compute
    dtype (said, and recorded), and a chat model that stops at its end-of-turn token, as an export's."""
    if dtype != torch.float32:
        model = model.to(dtype)
    chat = recipe.stage == "sft" or tokenizer.eos_token == "<|im_end|>"
    set_stop_tokens(model, tokenizer, chat)
    manifest["dtype"] = str(dtype).removeprefix("torch.")
    say(f"the model's weights are written in {manifest['dtype']}"
        + ("; it stops at <|im_end|>" if chat and "<|im_end|>" in tokenizer.get_vocab() else ""))
    return model


def _disk_needed(recipe, trainable: int, total: int) -> int:
    """Bytes for the kept checkpoints (weights + AdamW's two moments per trainable parameter) and the
    output, with a fifth to spare."""
    weights = (total if recipe.method == "full" else trainable) * 4
    per_checkpoint = weights + trainable * 8
    kept = recipe.train.keep_checkpoints if recipe.train.save_steps else 1  # the final one at least
    return int(1.2 * (per_checkpoint * (kept + 1) + weights))


def _check_reload(staging: Path, out: Path, probe, expected, device: str, dtype) -> dict:
    """Load what was written, as any later command will (fresh base, quantized again for QLoRA, parent
    chain applied), and require the trained model's logits."""
    reloaded, _, _ = load_for_inference(None, str(staging), device, dtype)
    report = compare(expected, probe_logits(reloaded, probe), dtype, f"reloading the new {out}")
    say(f"reload check: written weights reproduce the trained logits (max difference {report['max_logit_diff']:.2g})")
    return report


def _quantization(recipe, dtype) -> dict | None:
    if recipe.method != "qlora":
        return None
    described = describe_quant(recipe.quant, dtype)
    if recipe.train.strategy == "fsdp" and recipe.quant.bits == 4:
        described["storage"] = described["compute_dtype"]
    return described


def _quant_text(quantization: dict | None) -> str:
    if not quantization:
        return "full precision"
    if quantization["bits"] == 8:
        return "8-bit base"
    return f"4-bit {quantization['type']} base{', double-quantized' if quantization['double_quant'] else ''}"


def _describe_data(recipe, data: Prepared) -> None:
    s = data.stats
    say(f"data {recipe.data.path}: {s['examples']} {'documents' if recipe.stage == 'cpt' else 'conversations'}"
        f" -> {s['rows']} rows of up to {recipe.data.max_length} tokens "
        f"({'packed' if recipe.data.packing else 'not packed'}), {s['tokens']:,} tokens, "
        f"{s['trained_tokens']:,} trained")
    for note in data.notes:
        say(note)
    if data.system_prompt is not None:
        say(f"system prompt for conversations without one: {data.system_prompt!r}")


def _apply_parent(model, base_fingerprint: str, parent: str | None, model_name: str):
    """Fold the parent adapter chain into the base weights, after checking it was trained on this base."""
    return apply_chain(model, [parent], base_fingerprint, model_name, merge=True) if parent else model


def _train(model, tokenizer, data: Prepared, recipe, out: Path, device: str, dtype, checkpoint) -> dict:
    stop: dict = {}
    trainer, progress = build_trainer(model, tokenizer, data.rows, data.eval_rows, recipe, run_folder(out), device,
                                      dtype, stop)
    if checkpoint:
        say(f"resuming from {checkpoint}")
    try:
        # Under autocast, peft would first copy each LoRA input to fp32 (its weights' dtype) and keep the
        # copy for the backward pass: 8 of the 16 GB peak measured on the Qwen2-0.5B shape.
        half = dtype != torch.float32 and recipe.method != "full"
        with stop_on_signals(stop), disable_input_dtype_casting(model, active=half):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as exc:
        last = latest_checkpoint(run_folder(out))
        raise NonFiniteLoss(f"{exc}: training stopped before using it. " + (
            f"The last good checkpoint is {last}: resume with --resume and a lower train.lr" if last else
            "No checkpoint was written yet: lower train.lr and start again")) from None
    except OSError as exc:  # a checkpoint that did not fit on the disk, or a folder that went away
        drop_incomplete_checkpoints(run_folder(out))
        last = latest_checkpoint(run_folder(out))
        raise LorakitError(f"writing a checkpoint failed at step {trainer.state.global_step} ({exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "") + "); training stopped. " + (
            f"The last complete checkpoint is {last}: make room and continue with --resume" if last else
            "No complete checkpoint was kept: make room and start again")) from None
    finally:
        progress.close()
    if stop.get("signal"):
        raise Interrupted(f"{stop['signal']} at step {trainer.state.global_step}: checkpoint written to "
                          f"{latest_checkpoint(run_folder(out))}; continue with the same command and --resume")
    summary = progress.summary()
    if data.eval_rows:
        if not progress.evals or progress.evals[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()  # the final figures, unless the schedule just evaluated
        summary.update(eval_loss=progress.evals[-1]["eval_loss"], eval_ppl=progress.evals[-1]["eval_ppl"])
    say(f"loss {summary.get('first_loss', float('nan')):.4f} -> {summary.get('final_loss', float('nan')):.4f} "
        f"in {summary.get('steps', 0)} steps, {summary.get('tokens_per_s')} tokens/s")
    return {**summary, "history": progress.history, "evals": progress.evals}


def _manifest(recipe, model_name: str, base_fingerprint: str, data: Prepared, summary: dict, device, dtype,
              quantization: dict | None) -> dict:
    import peft
    import transformers

    local = Path(model_name).expanduser()
    parent = read_manifest(recipe.parent) if recipe.parent else None
    return {
        "lorakit_version": __version__,
        "name": recipe.output_dir.name,
        "recipe": recipe.name,
        "stage": recipe.stage,
        "method": recipe.method,
        "base_model": model_name,
        "base_model_path": str(local.resolve()) if local.exists() else None,
        "base_fingerprint": base_fingerprint,
        "parent": {"path": str(Path(recipe.parent).resolve()), "name": parent and parent.get("name"),
                   "stage": parent and parent.get("stage"), "copied_to": "parent/"} if recipe.parent else None,
        "system_prompt": data.system_prompt,
        "data": {"path": recipe.data.path, "hash": data.data_hash, **data.stats},
        "lora": None if recipe.method == "full" else
        {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "target": recipe.lora.target},
        "quantization": quantization,
        "metrics": summary,
        "trained_on": {"device": device, "dtype": str(dtype).removeprefix("torch.")},
        "versions": {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
    }
