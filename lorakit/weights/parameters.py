"""`lorakit inspect`: where a model's parameters are, and what share an adapter trains."""

from __future__ import annotations


def parameter_table(model) -> dict:
    """Rows of (name, shape, count, trainable) plus the totals a user asks about."""
    rows, seen = [], set()
    for name, param in model.named_parameters(remove_duplicate=False):
        shared = id(param) in seen
        seen.add(id(param))
        rows.append({"name": name, "shape": tuple(param.shape), "count": param.numel(),
                     "trainable": param.requires_grad or "lora_" in name, "tied": shared})
    unique = [r for r in rows if not r["tied"]]
    total = sum(r["count"] for r in unique)
    embed = sum(r["count"] for r in unique if "embed" in r["name"] or "lm_head" in r["name"])
    trainable = sum(r["count"] for r in unique if r["trainable"])
    return {"rows": rows, "total": total, "embedding_and_output": embed, "trainable": trainable}


def format_table(table: dict, with_adapter: bool) -> str:
    width = max(len(r["name"]) for r in table["rows"])
    lines = [f"{'parameter':<{width}}  {'shape':<16} {'count':>12}"]
    for r in table["rows"]:
        note = " (tied, counted once)" if r["tied"] else (" trainable" if with_adapter and r["trainable"] else "")
        lines.append(f"{r['name']:<{width}}  {list(r['shape'])!s:<16} {r['count']:>12,}{note}")
    total = table["total"]
    lines.append(f"total: {total:,} parameters")
    lines.append(f"embedding and output layers: {table['embedding_and_output']:,} "
                 f"({100 * table['embedding_and_output'] / total:.1f}%)")
    if with_adapter:
        lines.append(f"trainable (adapter): {table['trainable']:,} ({100 * table['trainable'] / total:.3f}%)")
    return "\n".join(lines)
