"""`GET /metrics`: what lorakit serve has done, in Prometheus' text format (as vLLM exposes its own): requests by
model, tokens read and generated, batches and their sizes, time spent waiting for a batch, cancellations, and the
adapters loaded now. Behind the API key like every endpoint but the page."""

from __future__ import annotations

from collections import Counter

FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def exposition(requests: Counter, stats: dict, waiting: int, adapters: int) -> str:
    """The metrics as Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP lorakit_{name} {text}", f"# TYPE lorakit_{name} {kind}"])
        lines.extend(f"lorakit_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "Generation requests accepted, by model.",
           [(f'{{model="{_escaped(model)}"}}', n) for model, n in sorted(requests.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of the finished rows.", [("", stats["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats["completion_tokens"])])
    metric("batches_total", "counter", "Batches generated (forward-pass groups).", [("", stats["batches"])])
    metric("batch_rows_total", "counter", "Rows generated in batches.", [("", stats["rows"])])
    metric("batch_size_max", "gauge", "The largest batch so far.", [("", stats["largest"])])
    metric("queue_wait_seconds_total", "counter", "Seconds rows waited from submission to their batch's start.",
           [("", stats["queue_wait_s"])])
    metric("cancelled_total", "counter", "Rows stopped because their client went away.", [("", stats["cancelled"])])
    metric("requests_waiting", "gauge", "Requests queued for the next batch.", [("", waiting)])
    metric("adapters_loaded", "gauge", "Adapters served now (the base not counted).", [("", adapters)])
    return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
