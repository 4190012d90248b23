"""Adapters that come and go while lorakit serve runs, through vLLM's runtime-loading API, so that tools written
for vLLM work unchanged:

    POST /v1/load_lora_adapter     {"lora_name": NAME, "lora_path": FOLDER, "load_inplace": false}
    POST /v1/unload_lora_adapter   {"lora_name": NAME}

Answers as vLLM's: 200 with "Success: LoRA adapter 'NAME' added successfully." (or "removed"), else an
OpenAI-shaped error: 400 for an adapter the server cannot take (the reason named: another base, a damaged file, a
full model, a name already served without load_inplace), 404 for a folder or a name that is not there.

An adapter is checked before anything loads, then loaded on the engine's thread between two forward passes (engine.call):
rows in flight never see a half-loaded model. A replaced or removed adapter stays in memory until the last row
using it is done (Session.hold / collect), so no answer changes under a request; new requests get the new one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..errors import LorakitError
from .guards import ApiError
from .session import check_name


class LoadBody(BaseModel, extra="allow"):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadBody(BaseModel, extra="allow"):
    lora_name: str = ""


def add_loading_routes(app, served: Callable[[], Iterable[str]], load, unload) -> None:
    """vLLM's runtime-loading endpoints, the same for both servers: the fields, the name and the answers checked
    here; `served()`: the adapters served now; `load(name, path)` (async) takes the adapter, raising
    FileNotFoundError for a folder that is not there or LorakitError for one the server cannot take, and returns
    the answer's text; `unload(name)` (async) likewise."""
    from fastapi.responses import PlainTextResponse

    one_at_a_time = asyncio.Lock()  # two loads of one name never interleave (vLLM locks per name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadBody):
        name, path = body.lora_name, body.lora_path
        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        async with one_at_a_time:
            try:
                check_name(name)
                if name in served() and not body.load_inplace:
                    raise LorakitError(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                       f"adapter in place, set 'load_inplace' to True.")
                text = await load(name, path)
            except FileNotFoundError as exc:
                raise ApiError(404, str(exc), "NotFoundError", "adapter_not_found") from None
            except LorakitError as exc:
                raise ApiError(400, str(exc)) from None
        return PlainTextResponse(text)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadBody):
        if not body.lora_name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        async with one_at_a_time:
            if body.lora_name not in served():
                raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "NotFoundError",
                               "adapter_not_found")
            return PlainTextResponse(await unload(body.lora_name))


def add_live_routes(app, session, engine) -> None:
    """The loading endpoints over lorakit's own engine: loaded on the engine's thread, between two forward passes."""

    async def load(name: str, path: str) -> str:
        await run_in_threadpool(session.check_new, path)
        await asyncio.wrap_future(engine.call(lambda: _load(session, engine, name, path)))
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(name: str) -> str:
        session.unload(name)
        engine.call(lambda: None)  # wakes an idle engine, which then frees what no row holds
        return f"Success: LoRA adapter '{name}' removed successfully."

    add_loading_routes(app, lambda: session.entries, load, unload)


def _load(session, engine, name: str, path: str) -> None:
    """On the engine's thread: the adapter loaded, and the engine generating with the model that holds it (a
    bare base becomes a peft model with its first adapter)."""
    session.load(name, path)
    engine.model = session.model  # before any batch, even where no `between` hook is set


def watch(folder: Path, session, engine, every_s: float = 1.0) -> threading.Thread:
    """`lorakit serve --watch DIR`: serve each finished adapter folder in DIR under its folder's name, load it
    again when it is replaced (a retrained adapter published over it), and stop serving it when it goes.

    Finished means what lorakit writes last: manifest.json (training and exports write a staging folder and
    rename it into place, so a half-written adapter is never under its own name); a plain peft folder counts once
    its weights have not changed between two looks. Hidden folders (lorakit's staging) are never read. A folder
    the server cannot take is named once on stderr and left alone."""
    from ..log import say

    seen: dict[str, tuple] = {}  # name -> the stamp it was loaded (or refused) with
    sizes: dict[str, tuple] = {}  # plain peft folders: the stamp at the last look

    def stamp(path: Path) -> tuple | None:
        marker = path / "manifest.json" if (path / "manifest.json").is_file() else path / "adapter_model.safetensors"
        if not marker.is_file():
            return None
        stat = marker.stat()
        return (marker.name, stat.st_mtime_ns, stat.st_size)

    def look() -> None:
        present = {}
        for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            now = stamp(path)
            if now is None or (now[0] != "manifest.json" and sizes.get(path.name) != now):
                sizes[path.name] = now  # a plain folder still being written, or first seen: look again next time
                continue
            present[path.name] = now
            if seen.get(path.name) == now:
                continue
            seen[path.name] = now
            try:
                check_name(path.name)
                session.check_new(str(path))
                engine.call(lambda n=path.name, p=str(path): _load(session, engine, n, p)).result()
                say(f"--watch: serving {path} as {path.name!r}")
            except (LorakitError, OSError) as exc:
                say(f"--watch: {path} is not served: {exc}")
        for name in [n for n in seen if n not in present]:
            del seen[name]
            if name in session.entries:
                session.unload(name)
                engine.call(lambda: None)
                say(f"--watch: {folder / name} is gone; {name!r} is no longer served")

    def loop() -> None:
        while True:
            try:
                look()
            except OSError as exc:  # the folder itself went away for a moment
                say(f"--watch: cannot read {folder} ({exc.strerror or exc})")
            time.sleep(every_s)

    look()  # what is there at start is served before the server answers
    thread = threading.Thread(target=loop, daemon=True, name="lorakit-watch")
    thread.start()
    return thread
