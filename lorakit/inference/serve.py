"""`lorakit serve`: an OpenAI-compatible HTTP API over one base model and its named adapters, and a page
that asks them all at once.

The request's `model` field picks the adapter ("base" or a name). Requests that arrive together are
generated together, in one forward pass per token, even for different adapters (engine.py); answers
stream as OpenAI's server-sent events when asked (`stream: true`). What one client sends never stalls
the others: bodies are bounded (--max-body), prompts are rendered and checked before they join a batch,
and a client that disconnects stops its own row.

Errors are always OpenAI's shape, {"error": {"message", "type", "code"}}. The interactive API pages
(/docs, /redoc, /openapi.json) are off: the API is OpenAI's, documented by OpenAI, and a local model
server has no reason to advertise itself. `/` is lorakit's comparison page (page.html).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import (
    Request,  # module level: FastAPI resolves the endpoints' annotations here
)

from ..data.chat import checked_messages
from ..errors import LorakitError
from .engine import Engine
from .engine import Request as Work
from .generate import Generation, Sampling, chat_prompt, text_prompt
from .guards import (  # noqa: F401  (the server's API)
    MAX_BODY,
    ApiError,
    ApiKey,
    BodyLimit,
    error_response,
    serve,
    server_config,
)
from .reasoning import Splitter, split
from .toolcalls import CallStream, text_of, tool_use

DISCONNECT_POLL_S = 0.1
PAGE = Path(__file__).with_name("page.html")

# OpenAI fields lorakit does not implement: accepted at these defaults only, else a 400 naming them.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "functions": (None, []), "response_format": (None, {"type": "text"}), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, "")}


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel, extra="allow"):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 stop strings, none of them empty")
        return tuple(stops)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables for the chat template, as vLLM takes them (Qwen3: {"enable_thinking": false})."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """False: at most one call in a reply (the first the model wrote)."""


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)


def base_app(names: Callable[[], list[str]], max_body: int, api_key: str | None = None):
    """The FastAPI app both servers share: body limit, API key, OpenAI-shaped errors, /v1/models (`names()`:
    what is served now), the page."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorakit", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)  # added last, so it runs first: no body is read without the key

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        message = {400: "the request body could not be read as JSON text (is it UTF-8?)",
                   404: "no such endpoint; lorakit serves /v1/chat/completions, /v1/completions and /v1/models",
                   405: "this endpoint does not take that HTTP method"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message,
                              "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception):
        return error_response(500, f"internal error ({type(exc).__name__}); the server keeps running", "server_error")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):
            return error_response(400, "the request body must be JSON, sent with Content-Type: application/json")
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body ({first.get('ctx', {}).get('error', 'cannot parse')} "
                                       f"at character {first.get('loc', ('', '?'))[-1]})")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return error_response(400, f"{where}: {first.get('msg', 'malformed request')}")

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "owned_by": "lorakit"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in names()]}

    @app.get("/v1/models/{name}")
    def model(name: str) -> dict[str, Any]:
        check_model(name, names())
        return card(name)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    return app


def check_model(name: str, names: list[str]) -> None:
    if name not in names:
        raise ApiError(404, f"model {name!r} not found; available: {', '.join(names)}", code="model_not_found")


def check_fields(body: _Body) -> None:
    """What lorakit does not implement, refused by name (never ignored in silence)."""
    if body.n != 1:
        raise ApiError(400, "n: lorakit serve returns one choice per request; send n requests instead",
                       code="unsupported")
    extra = body.model_extra or {}
    for name, defaults in UNSUPPORTED.items():
        if name in extra and extra[name] not in defaults:
            raise ApiError(400, f"{name}: not supported by lorakit serve", code="unsupported")


@dataclass
class Generator:
    """lorakit's own generation behind the API: the session's model, batched by the engine."""

    session: Any
    engine: Engine
    limit: int
    default_max_tokens: int = 256
    requests: Counter = field(default_factory=Counter)
    """Requests accepted, by model (for /metrics)."""

    async def work(self, body: _Body, max_tokens: int | None, make_prompt) -> Work:
        """The request as a row for the engine: checked, its prompt rendered and tokenized (outside the
        engine's thread, so a huge prompt never holds a batch up)."""
        from starlette.concurrency import run_in_threadpool

        check_fields(body)
        check_model(body.model, self.session.names)
        sampling = Sampling(temperature=body.temperature, top_k=0, top_p=body.top_p,
                            max_new_tokens=max_tokens or self.default_max_tokens, greedy=body.temperature == 0,
                            seed=body.seed)
        stops = body.stops()
        try:
            ids, stop_ids = await run_in_threadpool(make_prompt)
        except LorakitError as exc:  # a prompt the template cannot render as asked: the client's to change
            raise ApiError(400, str(exc)) from None
        if len(ids) + sampling.max_new_tokens > self.limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens {sampling.max_new_tokens}: more "
                                f"than this model's {self.limit}-token context", code="context_length_exceeded")
        try:
            adapter = self.session.hold(body.model)  # held until the row is done: a replaced adapter waits for it
        except KeyError:  # unloaded while the prompt was being rendered
            check_model(body.model, self.session.names)
            raise
        work = Work(ids, stop_ids, sampling, adapter, stops)
        self.requests[body.model] += 1
        work.done.add_done_callback(lambda _: self.session.release(adapter))
        return work

    async def answer(self, http: Request, work: Work) -> Generation:
        """Generate to the end, stopping the row if the client goes away meanwhile."""
        done = asyncio.wrap_future(self.engine.submit(work))
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
            if not done.done() and await http.is_disconnected():
                work.cancel.set()
        result = await done
        if work.cancel.is_set():
            raise ApiError(499, "the client closed the connection", code="client_closed")
        return result

    def stream(self, work: Work, chunk, usage_wanted: bool):
        """Server-sent events: a chunk per piece of text, then the finish reason (and usage), then [DONE].
        A client that disconnects ends the generator, which stops the row."""
        from fastapi.responses import StreamingResponse

        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        work.emit = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        done = asyncio.wrap_future(self.engine.submit(work))

        async def events():
            try:
                yield sse(chunk(None, None, first=True))
                while not (done.done() and pieces.empty()):
                    getter = asyncio.ensure_future(pieces.get())
                    finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in finished:
                        yield sse(chunk(getter.result(), None))
                    else:
                        getter.cancel()
                result = await done
                yield sse(chunk(None, result.finish_reason))
                if usage_wanted:
                    yield sse({**chunk(None, None), "choices": [], "usage": usage(result)})
                yield "data: [DONE]\n\n"
            finally:
                work.cancel.set()  # the client left mid-stream, or the stream ended: the row is done either way

        return StreamingResponse(events(), media_type="text/event-stream")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def create_app(session, max_input_tokens: int | None = None, default_max_tokens: int = 256, max_body: int = MAX_BODY,
               max_batch: int = 16, api_key: str | None = None, watch: Path | None = None):
    """The FastAPI app; `session` is a lorakit Session holding the base and the adapters."""
    from .live import add_live_routes

    app = base_app(lambda: session.names, max_body, api_key)
    limit = max_input_tokens or getattr(session.model.config, "max_position_embeddings", 4096)
    engine = Engine(session.model, session.tokenizer, max_batch, between=session.collect)
    generator = Generator(session, engine, limit, default_max_tokens)
    app.state.stats = generator.engine.stats
    add_live_routes(app, session, engine)
    if watch is not None:
        from .live import watch as watch_folder

        watch_folder(Path(watch), session, engine)

    @app.get("/metrics")
    def metrics():
        from fastapi.responses import Response

        from .metrics import FORMAT, exposition

        text = exposition(generator.requests, engine.stats, engine.generating, engine.pending.qsize(),
                          len(session.entries))
        return Response(text, media_type=FORMAT)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request):
        system = session.system_prompt(body.model) if body.model in session.names else None
        style = session.style(body.model) if body.model in session.names else session.style("base")
        kwargs = {**style.kwargs(), **(body.chat_template_kwargs or {})}
        try:
            use = tool_use(session.tokenizer, style, body.tools, body.tool_choice, body.parallel_tool_calls)
            messages = checked_messages([{**m.model_dump(exclude_none=True), "content": text_of(
                m.content, f"messages[{i}].content")} for i, m in enumerate(body.messages)], "the request", "messages",
                answer=False, tools=use.listed)
        except LorakitError as exc:
            raise ApiError(400, str(exc)) from None
        work = await generator.work(body, body.max_completion_tokens or body.max_tokens, lambda: chat_prompt(
            session.tokenizer, messages, system, style, kwargs, use.rendered, use.prefix))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # the reasoning apart from the answer, as vLLM's reasoning parser returns it
        thinking = bool(style.block) and kwargs.get(style.block.switch, True) is not False
        if body.stream:
            splitter = Splitter(style.block, thinking)
            calls = CallStream(use.format, use.names) if use.format else None

            def chunk(text, finish, first=False):
                reasoning, answer = splitter.feed(use.prefix if first else text or "", final=finish is not None)
                found = None
                if calls is not None:
                    answer = calls.feed(answer)
                    if finish is not None:
                        rest, found = calls.finish()
                        answer += rest
                delta = {**({"role": "assistant", "content": ""} if first else {}),
                         **({"reasoning_content": reasoning} if reasoning else {}),
                         **({"content": answer} if answer else {})}
                if found:
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(use.reply_calls(found))]
                    finish = "tool_calls"
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return generator.stream(work, chunk, bool(body.stream_options and body.stream_options.include_usage))
        g = await generator.answer(http, work)
        reasoning, answer = split(use.prefix + g.text, style.block, thinking)
        message = {"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning is not None
                                                              else {})}
        finish = g.finish_reason
        parsed = use.format.parse(answer, use.names) if use.format else None
        if parsed and parsed[1]:
            message.update(content=parsed[0] or None, tool_calls=use.reply_calls(parsed[1]))
            finish = "tool_calls"
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model, "usage": usage(g),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        work = await generator.work(body, body.max_tokens, lambda: text_prompt(session.tokenizer, body.prompt))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text, finish, first=False):
                return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}
            return generator.stream(work, chunk, bool(body.stream_options and body.stream_options.include_usage))
        g = await generator.answer(http, work)
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason}]}

    return app


