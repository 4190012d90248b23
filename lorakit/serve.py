"""`lorakit serve`: an OpenAI-compatible HTTP API over one base model and its named adapters.

The request's `model` field picks the adapter ("base" or a name). One lock serialises generation:
each request switches to its adapter and generates while holding it, so interleaved requests for
different adapters each get their own adapter's answer.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from .errors import LorakitError
from .generate import Generation, Sampling, chat_prompt, complete, text_prompt


class Message(BaseModel):
    role: str
    content: str


class _Request(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(session, max_input_tokens: int | None = None, default_max_tokens: int = 256):
    """The FastAPI app; `session` is a lorakit Session holding the base and the adapters."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="lorakit", version="1")
    lock = threading.Lock()
    limit = max_input_tokens or getattr(session.model.config, "max_position_embeddings", 4096)

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):
            return error(400, "the request body must be JSON, sent with Content-Type: application/json")
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body ({first.get('ctx', {}).get('error', 'cannot parse')} "
                              f"at character {first.get('loc', ('', '?'))[-1]})")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {first.get('msg', 'malformed request')}")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lorakit"} for n in session.names]}

    def run(request: _Request, make_prompt) -> Generation:
        if request.stream:
            raise ApiError(400, "stream: streaming is not supported by lorakit serve", code="unsupported")
        if request.model not in session.names:
            raise ApiError(404, f"model {request.model!r} not found; available: {', '.join(session.names)}",
                           code="model_not_found")
        max_tokens = request.max_tokens or default_max_tokens
        sampling = Sampling(temperature=request.temperature, top_k=0, top_p=request.top_p,
                            max_new_tokens=max_tokens, greedy=request.temperature == 0, seed=request.seed)
        with lock:
            session.use(request.model)
            ids, stops = make_prompt()
            if len(ids) + max_tokens > limit:
                raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens {max_tokens}: more than this "
                                    f"model's {limit}-token context", code="context_length_exceeded")
            with session.active() as model:
                return complete(model, session.tokenizer, ids, stops, sampling)

    def usage(g: Generation) -> dict:
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict[str, Any]:
        messages = [m.model_dump() for m in request.messages]
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages.{i}.role: {m['role']!r} is not system, user or assistant")
        g = run(request, lambda: chat_prompt(session.tokenizer, messages, session.system_prompt()))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": request.model, "usage": usage(g),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict[str, Any]:
        g = run(request, lambda: text_prompt(session.tokenizer, request.prompt))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": request.model, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason}]}

    return app


def serve(session, host: str, port: int, max_input_tokens: int | None = None) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        from .progress import say

        say(f"warning: serving on {host}: anyone who can reach this address can use the model")
    try:
        uvicorn.run(create_app(session, max_input_tokens), host=host, port=port, log_level="info")
    except OSError as exc:
        raise LorakitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
