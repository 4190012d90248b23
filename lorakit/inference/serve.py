"""`lorakit serve`: an OpenAI-compatible HTTP API over one base model and its named adapters.

The request's `model` field picks the adapter ("base" or a name). What one client sends never stalls
the others: bodies are bounded (--max-body), prompts are rendered and tokenized outside the lock, a
client that disconnects stops its own generation, and only the generation itself holds the lock
(one model in memory: each request switches to its adapter and generates while holding it, so
interleaved requests for different adapters each get their own adapter's answer).

Errors are always OpenAI's shape, {"error": {"message", "type", "code"}}. The interactive API pages
(/docs, /redoc, /openapi.json) are off: the API is OpenAI's, documented by OpenAI, and a local model
server has no reason to advertise itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import (
    Request,  # module level: FastAPI resolves the endpoints' annotations here
)

from ..errors import LorakitError
from .generate import Generation, Sampling, chat_prompt, complete, text_prompt

MAX_BODY = 1 << 20  # 1 MiB: far above any prompt that fits a small model's context, far below harm
DISCONNECT_POLL_S = 0.1

# OpenAI fields lorakit does not implement: accepted at these defaults only, else a 400 naming them.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None,),
               "functions": (None, []), "response_format": (None, {"type": "text"}), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, "")}


class Message(BaseModel):
    role: str
    content: str


class _Request(BaseModel, extra="allow"):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 stop strings, none of them empty")
        return tuple(stops)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413 before anything parses it (one
    20 MB body used to hold the server for half a minute and 1.5 GB). The body is read here and handed
    on whole; later receives (a disconnect) pass through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                               f"(lorakit serve --max-body)", code="request_too_large")
        await response(scope, receive, send)


def create_app(session, max_input_tokens: int | None = None, default_max_tokens: int = 256, max_body: int = MAX_BODY):
    """The FastAPI app; `session` is a lorakit Session holding the base and the adapters."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorakit", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.stats = {"cancelled": 0}
    lock = threading.Lock()
    limit = max_input_tokens or getattr(session.model.config, "max_position_embeddings", 4096)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        message = {400: "the request body could not be read as JSON text (is it UTF-8?)",
                   404: "no such endpoint; lorakit serves /v1/chat/completions, /v1/completions and /v1/models",
                   405: "this endpoint does not take that HTTP method"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception):
        return _error(500, f"internal error ({type(exc).__name__}); the server keeps running", "server_error")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):
            return _error(400, "the request body must be JSON, sent with Content-Type: application/json")
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body ({first.get('ctx', {}).get('error', 'cannot parse')} "
                               f"at character {first.get('loc', ('', '?'))[-1]})")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _error(400, f"{where}: {first.get('msg', 'malformed request')}")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "owned_by": "lorakit"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in session.names]}

    @app.get("/v1/models/{name}")
    def model(name: str) -> dict[str, Any]:
        if name not in session.names:
            raise ApiError(404, f"model {name!r} not found; available: {', '.join(session.names)}",
                           code="model_not_found")
        return model_card(name)

    def check(request: _Request, max_tokens: int | None) -> Sampling:
        """Everything that can be refused, refused before any work."""
        if request.stream:
            raise ApiError(400, "stream: streaming is not supported by lorakit serve", code="unsupported")
        if request.n != 1:
            raise ApiError(400, "n: lorakit serve returns one choice per request; send n requests instead",
                           code="unsupported")
        extra = request.model_extra or {}
        for name, defaults in UNSUPPORTED.items():
            if name in extra and extra[name] not in defaults:
                raise ApiError(400, f"{name}: not supported by lorakit serve", code="unsupported")
        if request.model not in session.names:
            raise ApiError(404, f"model {request.model!r} not found; available: {', '.join(session.names)}",
                           code="model_not_found")
        return Sampling(temperature=request.temperature, top_k=0, top_p=request.top_p,
                        max_new_tokens=max_tokens or default_max_tokens, greedy=request.temperature == 0,
                        seed=request.seed)

    async def run(http: Request, request: _Request, sampling: Sampling, make_prompt) -> Generation:
        stops = request.stops()
        ids, stop_ids = await run_in_threadpool(make_prompt)  # rendering and tokenizing hold no lock
        if len(ids) + sampling.max_new_tokens > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens {sampling.max_new_tokens}: more "
                                f"than this model's {limit}-token context", code="context_length_exceeded")
        cancel = threading.Event()

        def generate() -> Generation | None:
            with lock:
                if cancel.is_set():  # the client left while waiting for its turn
                    return None
                session.use(request.model)
                with session.active() as lm:
                    return complete(lm, session.tokenizer, ids, stop_ids, sampling, stop_strings=stops, cancel=cancel)

        task = asyncio.ensure_future(run_in_threadpool(generate))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await http.is_disconnected():
                cancel.set()
                app.state.stats["cancelled"] += 1
        result = await task
        if cancel.is_set():
            raise ApiError(499, "the client closed the connection", code="client_closed")
        return result

    def usage(g: Generation) -> dict:
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request) -> dict[str, Any]:
        sampling = check(body, body.max_completion_tokens or body.max_tokens)
        messages = [m.model_dump() for m in body.messages]
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages.{i}.role: {m['role']!r} is not system, user or assistant")
        system = session.system_prompt(body.model)
        g = await run(http, body, sampling, lambda: chat_prompt(session.tokenizer, messages, system))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": usage(g),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> dict[str, Any]:
        sampling = check(body, body.max_tokens)
        g = await run(http, body, sampling, lambda: text_prompt(session.tokenizer, body.prompt))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason}]}

    return app


def serve(session, host: str, port: int, max_input_tokens: int | None = None, max_body: int = MAX_BODY) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        from ..log import say

        say(f"warning: serving on {host}: anyone who can reach this address can use the model")
    try:
        uvicorn.run(create_app(session, max_input_tokens, max_body=max_body), host=host, port=port, log_level="info")
    except OSError as exc:
        raise LorakitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
