"""`lorakit serve --engine vllm`: vLLM serves the base and every adapter (batched across adapters,
tensor-parallel across GPUs), and lorakit stands in front of it so that clients see exactly what
`lorakit serve` gives them.

    client -> lorakit (--host/--port): /v1/models and the page answered here; chat requests without a
              system turn get the one the adapter was trained with, and stop at the end-of-turn token
           -> vLLM (127.0.0.1, a free port): its OpenAI server with --enable-lora --lora-modules NAME=FOLDER ...,
              started and stopped by lorakit; a CPT -> SFT chain is flattened into one adapter first
              (weights.flatten), because a serving engine applies one adapter per request.

vLLM pins its own transformers, so it lives in a virtual environment of its own: lorakit runs it with
that environment's Python, found from --vllm, $LORAKIT_VLLM or `vllm` on PATH (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..log import say
from ..system import cache_home
from .serve import (
    ApiError,
    ChatBody,
    CompletionBody,
    base_app,
    check_fields,
    check_model,
)
from .toolcalls import NO_TOOLS
from .vllm_process import (
    find_vllm,
    free_port,
    root_cause,
    signals_exit,
    start,
    stop,
    watch_engine,
)

LIVE_RANK = 64  # the rank vLLM started on a bare base holds, for adapters loaded while it serves
@dataclass
class Deployment:
    """What vLLM is started with, and what the front needs to know of each model name."""

    base: str
    adapters: dict[str, Path]
    """name -> a plain (flattened) peft adapter folder."""
    system_prompts: dict[str, str | None]
    stop_ids: list[int]
    max_rank: int
    names: list[str] = field(default_factory=list)
    template_kwargs: dict[str, dict] = field(default_factory=dict)
    """name -> the chat template variables its data.reasoning renders with (Qwen3 "empty": thinking off)."""
    reasoning_parser: str | None = None
    """vLLM's parser that returns a reply's reasoning as reasoning_content (the family's)."""
    tool_parser: str | None = None
    """vLLM's parser of the family's tool calls, where the template renders tools."""
    tokenizer: Any = None
    cache: Path | None = None
    """Where the flattened adapters are written (and found again)."""

    def take(self, name: str, folder: Path) -> None:
        """Serve the flattened adapter at `folder` as `name`, with its recorded system prompt and reasoning style."""
        from ..data.template import style_for
        from ..weights.folders import read_manifest

        manifest = read_manifest(folder)
        self.adapters[name] = folder
        prompt = manifest.system_prompt if manifest else None
        self.system_prompts[name] = prompt if prompt is not None else self.system_prompts["base"]
        self.template_kwargs[name] = style_for(self.tokenizer, (manifest.reasoning if manifest else None)
                                               or "keep").kwargs()
        if name not in self.names:
            self.names.append(name)

    def drop(self, name: str) -> None:
        for table in (self.adapters, self.system_prompts, self.template_kwargs):
            table.pop(name, None)
        self.names.remove(name)


def deploy(session_entries: dict[str, str], model: str | None, cache: Path, force: bool) -> Deployment:
    """Flatten every adapter chain into one adapter under `cache` (reused when its sources are unchanged),
    and gather what the front needs: the recorded system prompts and the end-of-turn stop tokens."""
    from ..data.template import end_of_turn, template_system_prompt
    from ..data.tools import renders_tools
    from ..families import family_of
    from ..weights.flatten import rank_of
    from ..weights.folders import base_of, split_full_model
    from ..weights.loading import load_config, load_tokenizer

    model, kept = split_full_model(model, list(session_entries.values()))
    entries = {n: p for n, p in session_entries.items() if p in kept}
    base = model or base_of(next(iter(entries.values())))
    tokenizer = load_tokenizer(base)
    # chat stops at the end of the turn and at EOS (as generate.chat_prompt); text at EOS, the last of these
    stops = [tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id]
    stops = list(dict.fromkeys(stops))
    family = family_of(load_config(base))
    deployment = Deployment(base, {}, {"base": template_system_prompt(tokenizer)}, stops, LIVE_RANK, ["base"], {},
                            family.vllm_reasoning_parser if family else None,
                            family.vllm_tool_parser if family and renders_tools(tokenizer) else None,
                            tokenizer=tokenizer, cache=cache)
    for name, path in entries.items():
        deployment.take(name, flattened(deployment, path, force))
    # the adapters' own largest rank (a larger --max-lora-rank pads every adapter, and vLLM's CPU kernels then sum
    # in another order: a tiny Llama's greedy answer flipped once in CI), or LIVE_RANK for a bare base
    ranks = [rank_of(f) for f in deployment.adapters.values()]
    deployment.max_rank = _supported_rank(max(ranks) if ranks else LIVE_RANK)
    return deployment


def flattened(deployment: Deployment, path: str, force: bool = False) -> Path:
    """The adapter's chain as one plain adapter under the deployment's cache (reused while its sources are
    unchanged): what vLLM loads."""
    from ..weights.flatten import export_flat_adapter
    from ..weights.folders import adapter_chain, weights_digest

    chain = adapter_chain(path)
    folder = deployment.cache / "-".join(weights_digest(f)[:12] for f in chain)
    if not (folder / "manifest.json").is_file():
        export_flat_adapter(str(path), folder, model_name=deployment.base, force=force, overwrite=True)
    return folder


def command(launcher: list[str], deployment: Deployment, port: int, options: tuple[str, ...]) -> list[str]:
    """vLLM's OpenAI server: the base under the name "base", each adapter under its own name, the LoRA
    limits set from the adapters themselves; the user's engine options (--tensor-parallel-size ...) appended."""
    loras = [f"{name}={folder}" for name, folder in deployment.adapters.items()]
    args = [*launcher, "--model", deployment.base, "--served-model-name", "base", "--host", "127.0.0.1",
            "--port", str(port)]
    if deployment.reasoning_parser:
        args += ["--reasoning-parser", deployment.reasoning_parser]
    if deployment.tool_parser:  # `tools` answered with OpenAI tool_calls, as lorakit serve answers them
        args += ["--enable-auto-tool-choice", "--tool-call-parser", deployment.tool_parser]
    # LoRA is always on, so that adapters can be loaded while it serves (up to max_rank: the adapters' own, or
    # LIVE_RANK on a bare base); VLLM_ALLOW_RUNTIME_LORA_UPDATING (start()) turns on vLLM's loading endpoints
    args += ["--enable-lora", "--max-lora-rank", str(deployment.max_rank), "--max-loras", str(max(len(loras), 1))]
    if loras:
        args += ["--lora-modules", *loras]
    return args + list(options)


def _supported_rank(rank: int) -> int:
    """vLLM takes --max-lora-rank from a fixed list; the smallest that holds every adapter."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if allowed >= rank:
            return allowed
    raise LorakitError(f"a flattened adapter has rank {rank}, more than vLLM's largest (512)")




def create_proxy_app(deployment: Deployment, engine_url: str, max_body: int, api_key: str | None = None):
    """The front: lorakit's own /v1/models, page and errors; generation forwarded to vLLM, with each
    adapter's recorded system prompt and the end-of-turn stop added where lorakit serve adds them."""
    from fastapi.responses import JSONResponse, StreamingResponse

    app = base_app(lambda: deployment.names, max_body, api_key)

    async def forward(path: str, payload: dict, stream: bool):
        loop = asyncio.get_running_loop()
        request = urllib.request.Request(f"{engine_url}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            response = await loop.run_in_executor(None, lambda: urllib.request.urlopen(request, timeout=600))
        except urllib.error.HTTPError as exc:
            raise _vllm_error(exc) from None
        except (urllib.error.URLError, ConnectionError) as exc:  # vLLM is gone: lorakit ends too (watch_engine)
            raise ApiError(503, f"vLLM is not answering ({getattr(exc, 'reason', exc)})") from None
        if not stream:
            return JSONResponse(json.loads(await loop.run_in_executor(None, response.read)))

        async def events():
            try:
                while line := await loop.run_in_executor(None, response.readline):
                    yield line
            finally:
                response.close()  # the client left: closing the connection stops vLLM's generation

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        check_fields(body)
        check_model(body.model, deployment.names)
        if body.tools and body.tool_choice != "none" and not deployment.tool_parser:
            raise ApiError(400, NO_TOOLS)  # as lorakit serve says it (vLLM would name its own flag)
        payload = body.model_dump(exclude_none=True)
        if body.messages[0].role != "system" and deployment.system_prompts.get(body.model) is not None:
            payload["messages"] = [{"role": "system", "content": deployment.system_prompts[body.model]}, *payload["messages"]]
        payload["stop_token_ids"] = deployment.stop_ids
        defaults = deployment.template_kwargs.get(body.model) or {}
        if defaults:
            payload["chat_template_kwargs"] = {**defaults, **(body.chat_template_kwargs or {})}
        return await forward("/v1/chat/completions", payload, body.stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_fields(body)
        check_model(body.model, deployment.names)
        payload = {**body.model_dump(exclude_none=True), "stop_token_ids": deployment.stop_ids[-1:]}  # EOS, as lorakit
        return await forward("/v1/completions", payload, body.stream)

    add_vllm_live_routes(app, deployment, engine_url)
    return app


def add_vllm_live_routes(app, deployment: Deployment, engine_url: str) -> None:
    """vLLM's runtime-loading endpoints in front of vLLM: the adapter checked and its chain flattened here (as at
    start), then vLLM asked to load the flattened folder; vLLM's answer passed back."""
    from starlette.concurrency import run_in_threadpool

    from ..weights.flatten import rank_of
    from ..weights.folders import adapter_chain
    from ..weights.variants import VLLM, refuse
    from .live import add_loading_routes
    from .session import check_adapter_path

    def prepare(path: str) -> Path:
        check_adapter_path(path)
        refuse(adapter_chain(path), VLLM)
        folder = flattened(deployment, path)  # checks the base's fingerprint too
        if rank_of(folder) > deployment.max_rank:
            raise LorakitError(f"{path}: rank {rank_of(folder)} is above the --max-lora-rank vLLM was started "
                               f"with ({deployment.max_rank}); restart with that adapter given as --adapter")
        return folder

    def ask(path: str, payload: dict) -> str:
        request = urllib.request.Request(f"{engine_url}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            raise _vllm_error(exc) from None

    async def load(name: str, path: str) -> str:
        folder = await run_in_threadpool(prepare, path)
        text = await run_in_threadpool(ask, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder),
                                                                       "load_inplace": name in deployment.adapters})
        deployment.take(name, folder)
        return text

    async def unload(name: str) -> str:
        deployment.drop(name)  # new requests: 404 at once
        return await run_in_threadpool(ask, "/v1/unload_lora_adapter", {"lora_name": name})

    add_loading_routes(app, lambda: deployment.adapters, load, unload)


def _vllm_error(exc: urllib.error.HTTPError) -> ApiError:
    """vLLM's error answer as lorakit's, its message kept."""
    body = json.loads(exc.read() or b"{}")
    message = (body.get("error") or {}).get("message") or body.get("message") or str(exc)
    return ApiError(exc.code, f"vLLM: {message}")


def serve_with_vllm(entries: dict[str, str], model: str | None, host: str, port: int, *, vllm: str | None,
                    engine_options: tuple[str, ...], max_body: int, force: bool, api_key: str | None = None) -> None:
    from ..weights.folders import adapter_chain
    from ..weights.variants import VLLM, refuse
    from .serve import serve

    for path in entries.values():  # what vLLM cannot apply, named before vLLM is looked for or anything flattened
        refuse(adapter_chain(path), VLLM)
    launcher = find_vllm(vllm)
    cache = cache_home() / "flattened"
    cache.mkdir(parents=True, exist_ok=True)
    deployment = deploy(entries, model, cache, force)
    engine_port = free_port()
    with signals_exit():
        process = start(command(launcher, deployment, engine_port, engine_options), engine_port,
                        cache / f"vllm-{engine_port}.log")
        leaving = threading.Event()
        try:
            say(f"vLLM serves {', '.join(deployment.names)}; lorakit answers on http://{host}:{port}/v1")
            died = watch_engine(process, leaving)
            try:
                serve(create_proxy_app(deployment, f"http://127.0.0.1:{engine_port}", max_body, api_key), host, port,
                      keyed=bool(api_key))
            except SystemExit:
                if not died.is_set():
                    raise
            if died.is_set():  # one line, exit code 1, as when vLLM cannot start
                log, code = cache / f"vllm-{engine_port}.log", process.returncode
                how = f"killed by signal {-code}" if code < 0 else f"code {code}"
                raise LorakitError(f"vLLM exited ({how}) while serving: "
                                   f"{root_cause(log.read_text(errors='replace'))[-600:]} (its log: {log})")
        finally:
            leaving.set()
            stop(process)
            print("vLLM stopped", file=sys.stderr)
