"""What a run shows and keeps: the progress bar, metrics.jsonl and loss.png (one-line messages: log.say)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from .checkpoints import StopRequest
from .loss import perplexity


class ProgressCallback(TrainerCallback):
    """A bar with step, loss, tokens/s and ETA; every log line appended to metrics.jsonl."""

    def __init__(self, metrics_path: Path, collator, stop: StopRequest):
        self.metrics_path = metrics_path
        self.collator = collator
        self.stop = stop
        self.bar = None
        self.start = 0.0
        self.resumed_tokens, self.resumed_seconds = 0, 0.0  # what the run had done before a resume
        self.batches = 0  # micro-batches trained so far
        self.history: list[dict] = []
        self.evals: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        from .checkpoints import trim_metrics

        self.start = time.perf_counter()
        if state.global_step and state.is_world_process_zero:  # resumed: continue the curve from there
            kept = trim_metrics(self.metrics_path, state.global_step)
            self.history = [e for e in kept if "loss" in e]
            self.evals = [e for e in kept if "eval_loss" in e]
            if self.history:
                self.resumed_tokens, self.resumed_seconds = self.history[-1]["tokens"], self.history[-1]["elapsed_s"]
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_substep_end(self, args, state, control, **kwargs):
        self.batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.batches += 1
        if state.global_step == state.max_steps:
            control.should_log = True  # the final loss is always logged, whatever logging_steps says
        if self.stop:  # Ctrl-C / SIGTERM: checkpoint this step, then stop
            control.should_save = control.should_training_stop = control.should_log = True
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        local = self.collator.tokens_in(self.batches)
        tokens = self.resumed_tokens + _sum_over_processes(local) if logs and "loss" in logs else 0
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            self.evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"],
                               "eval_ppl": perplexity(logs["eval_loss"])})
            self._append(self.evals[-1])
            return
        if "loss" not in logs:
            return
        elapsed = self.resumed_seconds + time.perf_counter() - self.start
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "loss": logs["loss"],
                 "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                 "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
                 "elapsed_s": round(elapsed, 2)}
        self.history.append(entry)
        self._append(entry)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=entry["tokens_per_s"], refresh=False)

    def _append(self, entry: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bar's line (also when training stops on an error, so the message starts clean)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> dict:
        """First and final loss, steps, tokens and speed of the run."""
        if not self.history:
            return {}
        last = self.history[-1]
        return {"first_loss": self.history[0]["loss"], "final_loss": last["loss"], "steps": last["step"],
                "tokens": last["tokens"], "tokens_per_s": last["tokens_per_s"], "runtime_s": last["elapsed_s"]}


def _sum_over_processes(count: int) -> int:
    """Real tokens trained by all processes together (every rank logs at the same steps)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    total = torch.tensor([count], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total)
    return int(total.item())


def plot_loss(history: list[dict], out: Path, title: str, evals: list[dict] = ()) -> None:
    """The loss curve (and the eval loss, if any) as a PNG beside the adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="." if len(history) < 60 else None,
            label="training loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], marker="o", label="eval loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
