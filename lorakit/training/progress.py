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

    def __init__(self, metrics_path: Path, collator, stop: StopRequest, preference: bool = False):
        self.metrics_path = metrics_path
        self.collator = collator
        self.stop = stop
        self.preference = preference  # its eval loss is no perplexity: its metrics (rewards/...) are logged instead
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
            extra = _stage_metrics(logs) if self.preference else {"eval_ppl": perplexity(logs["eval_loss"])}
            self.evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"], **extra})
            self._append(self.evals[-1])
            return
        if "loss" not in logs:
            return
        elapsed = self.resumed_seconds + time.perf_counter() - self.start
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "loss": logs["loss"],
                 "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                 "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
                 "elapsed_s": round(elapsed, 2), **_stage_metrics(logs)}
        self.history.append(entry)
        self._append(entry)
        if self.bar is not None:
            accuracy = {"acc": f"{entry['rewards/accuracies']:.2f}"} if "rewards/accuracies" in entry else {}
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", **accuracy, tok_s=entry["tokens_per_s"], refresh=False)

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
                "tokens": last["tokens"], "tokens_per_s": last["tokens_per_s"], "runtime_s": last["elapsed_s"],
                **_stage_metrics(last)}


def _stage_metrics(logs: dict) -> dict:
    """A preference stage's own metrics (rewards/chosen, rewards/accuracies, kl, ...) as logged."""
    return {k: v for k, v in logs.items() if "/" in k or k.removeprefix("eval_") in ("kl", "log_odds_ratio",
                                                                                     "log_odds_chosen")}


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


def _plot_rewards(ax, history: list[dict], evals) -> None:
    steps = [h["step"] for h in history if "rewards/accuracies" in h]
    ax.plot(steps, [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h], label="reward accuracy")
    if any("rewards/margins" in h for h in history):
        ax.plot(steps, [h.get("rewards/margins", 0) for h in history if "rewards/accuracies" in h], label="reward margin")
    held = [e for e in evals if "eval_rewards/accuracies" in e]
    if held:
        ax.plot([e["step"] for e in held], [e["eval_rewards/accuracies"] for e in held], marker="o",
                label="held-out accuracy")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_title("chosen vs rejected")
    ax.legend()
    ax.grid(alpha=0.3)


def plot_loss(history: list[dict], out: Path, title: str, evals: list[dict] = ()) -> None:
    """The loss curve (and the eval loss, if any) as a PNG beside the adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preference = any("rewards/accuracies" in h for h in history)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(11 if preference else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    if preference:  # what a preference run is for: chosen answers winning, by a growing margin
        _plot_rewards(axes[0][1], history, evals)
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


def loss_line(summary: dict, logged: int, steps: int, every: int) -> str:
    """The run's loss in one line; one logged step is no trend, so it is not written as one."""
    speed = f"{summary.get('tokens_per_s')} tokens/s"
    if logged == 0:
        return f"{steps} steps, no loss logged (train.logging_steps is {every})"
    if logged == 1:
        return (f"loss {summary['final_loss']:.4f} at step {summary['steps']} of {steps} (the only logged step: "
                f"train.logging_steps is {every}), {speed}")
    return f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {steps} steps, {speed}"
