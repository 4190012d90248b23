"""`GET /metrics`: what lorakit serve has done, in Prometheus' text format (as vLLM exposes its own): requests by
model, tokens read and generated, forward passes and the rows in them, time spent waiting to be admitted, cancellations,
rows generating and waiting now, and the adapters loaded now. Behind the API key like every endpoint but the page."""

from __future__ import annotations

from collections import Counter

FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def exposition(requests: Counter, stats: dict, running: int, waiting: int, adapters: int) -> str:
    """The metrics as Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP lorakit_{name} {text}", f"# TYPE lorakit_{name} {kind}"])
        lines.extend(f"lorakit_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "Generation requests accepted, by model.",
           [(f'{{model="{_escaped(model)}"}}', n) for model, n in sorted(requests.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of the finished rows.", [("", stats["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats["completion_tokens"])])
    metric("forward_passes_total", "counter", "Forward passes: a prefill of arriving rows, or one token of every "
           "running row.", [("", stats["passes"])])
    metric("batch_rows_total", "counter", "Rows admitted to the running batch.", [("", stats["rows"])])
    metric("batch_size_max", "gauge", "The most rows generating at once so far.", [("", stats["largest"])])
    metric("queue_wait_seconds_total", "counter", "Seconds rows waited from submission to their prefill.",
           [("", stats["queue_wait_s"])])
    metric("cancelled_total", "counter", "Rows stopped because their client went away.", [("", stats["cancelled"])])
    metric("requests_running", "gauge", "Rows generating now.", [("", running)])
    metric("requests_waiting", "gauge", "Requests queued for a place in the running batch.", [("", waiting)])
    metric("adapters_loaded", "gauge", "Adapters served now (the base not counted).", [("", adapters)])
    return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
