"""`lorakit adapters list / show`: what is on disk, read from the manifests."""

from __future__ import annotations

from pathlib import Path

from .adapters import is_full_model, read_manifest
from .errors import LorakitError


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 2**20:.1f} MiB" if total >= 2**20 else f"{total / 2**10:.0f} KiB"


def _row(folder: Path) -> list[str]:
    m = read_manifest(folder) or {}
    loss = (m.get("metrics") or {}).get("final_loss")
    parent = m.get("parent") or {}
    kind = m.get("method") or ("model" if is_full_model(folder) else "peft (no manifest)")
    return [folder.name, m.get("stage") or "-", kind, str(m.get("base_model") or "-"),
            parent.get("name") or "-", _size(folder), f"{loss:.4f}" if loss is not None else "-",
            (m.get("created") or "-")[:16]]


def list_adapters(folder: str | Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"{folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ((p / "adapter_config.json").is_file() or (p / "manifest.json").is_file()))
    if not found:
        return f"no adapters under {folder}"
    rows = [["name", "stage", "method", "base", "parent", "size", "final loss", "created"]]
    rows += [_row(p) for p in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def find(name: str) -> dict:
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
