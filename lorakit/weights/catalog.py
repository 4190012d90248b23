"""`lorakit adapters list / show`: what is on disk, read from the manifests."""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError
from .folders import is_full_model, read_manifest
from .manifest import Manifest
from .outputs import describe_size, folder_size, leftovers, sweep


def _row(folder: Path) -> list[str]:
    size = describe_size(folder_size(folder))
    try:
        m = read_manifest(folder)
    except LorakitError as exc:  # one damaged manifest must not hide the rest of the list
        return [folder.name, "-", f"unreadable: {str(exc).split(': ', 1)[-1]}", "-", "-", size, "-", "-"]
    if m is None:
        return [folder.name, "-", "model" if is_full_model(folder) else "peft (no manifest)", "-", "-", size, "-", "-"]
    loss = m.metrics.get("final_loss") if isinstance(m.metrics, dict) else None
    return [folder.name, m.stage or "-", m.method or m.kind, str(m.base_model or "-"),
            (m.parent.name if m.parent else None) or "-", size, f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
            (m.created or "-")[:16]]


def list_adapters(folder: str | Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"{folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ((p / "adapter_config.json").is_file() or (p / "manifest.json").is_file()))
    lines = [f"no adapters under {folder}"]
    if found:
        rows = [["name", "stage", "method", "base", "parent", "size", "final loss", "created"]]
        rows += [_row(p) for p in found]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    left = leftovers(folder)
    if left:
        total = describe_size(sum(folder_size(p) for p in left))
        lines.append(f"{len(left)} unfinished write(s) of stopped runs ({', '.join(p.name for p in left)}; {total}): "
                     f"removed by the next write here, or now by `lorakit adapters clean {folder}`")
    return "\n".join(lines)


def clean(folder: str | Path) -> str:
    """`lorakit adapters clean`: remove what killed runs left half-written under FOLDER."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"{folder}: no such folder")
    sizes = {p: folder_size(p) for p in leftovers(folder)}
    removed = sweep(folder)
    if not removed:
        return f"nothing to clean under {folder}"
    return f"removed {', '.join(p.name for p in removed)} ({describe_size(sum(sizes[p] for p in removed))})"


def find(name: str) -> Manifest:
    """The manifest of the adapter NAME: a folder path, or a folder under adapters/."""
    if ".." in Path(name).parts:
        raise LorakitError(f"{name}: adapter names cannot climb out of their folder with '..'")
    for folder in (Path(name), Path("adapters") / name):
        if folder.is_dir():
            manifest = read_manifest(folder)
            if manifest is None:
                raise LorakitError(f"{folder}: no lorakit manifest (a plain peft adapter?)")
            return manifest
    raise LorakitError(f"{name}: no such adapter (looked in . and adapters/)")
