"""What stands between lorakit serve and its clients: request bodies bounded before anything parses them,
errors in OpenAI's shape, only loopback names answered on a loopback server (DNS rebinding), and a deadline
for each request's headers. Both engines (lorakit's own and the vLLM front) are served through here."""

from __future__ import annotations

from ..errors import LorakitError

MAX_BODY = 1 << 20  # 1 MiB: far above any prompt that fits a small model's context, far below harm


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
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
        response = error_response(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                                       f"(lorakit serve --max-body)", code="request_too_large")
        await response(scope, receive, send)


class ApiKey:
    """ASGI middleware: with --api-key (or $LORAKIT_API_KEY), every request but the page itself (`GET /`, which
    asks for the key) must carry `Authorization: Bearer KEY`, as vLLM's --api-key and OpenAI's clients do;
    else 401 in OpenAI's shape. The comparison is constant-time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        import hmac

        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] == "/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                response = error_response(401, "this server needs its API key: send Authorization: Bearer KEY "
                                               "(the key lorakit serve was started with, --api-key)",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADER_TIMEOUT_S = 10.0
"""A connection must send a request's headers within this many seconds of opening (or of its last answer),
else it is closed: sockets that never finished their headers used to stay open for ever."""


class HostCheck:
    """ASGI middleware: a server bound to loopback answers only requests addressed to loopback (`Host:
    127.0.0.1:8000`, `localhost`, `[::1]`). A web page on another site could otherwise reach it through
    DNS rebinding (its own name re-pointed at 127.0.0.1) and use the model from the user's browser. A
    server bound to a named address also answers that name; bound to 0.0.0.0 or ::, any name."""

    def __init__(self, app, host: str):
        self.app = app
        self.allowed = None if host in ("0.0.0.0", "::", "") else {*LOOPBACK, "[::1]", host.lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
            if _host_name(header) not in self.allowed:
                response = error_response(400, f"Host {header!r} is not an address this server answers to (it "
                                               f"serves {', '.join(sorted(self.allowed))}); lorakit serve --host "
                                               f"NAME answers NAME too", code="invalid_host")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `[::1]`, `localhost:8000` -> `localhost`."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _protocol():
    """uvicorn's h11 protocol with a deadline for each request's headers (uvicorn has none: a client that
    sends half a header line holds its socket for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            before = self.cycle
            super().handle_events()
            if self.cycle is not before and self._deadline is not None:  # a request's headers arrived
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._expire)

        def _expire(self):
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def server_config(app, host: str, port: int, log_level: str = "info"):
    """The uvicorn configuration both engines serve with: the Host check, the header deadline."""
    import uvicorn

    return uvicorn.Config(HostCheck(app, host), host=host, port=port, log_level=log_level, http=_protocol())


def serve(app, host: str, port: int, keyed: bool = False) -> None:
    """Run `app` until stopped; `keyed`: it asks for an API key (else, off loopback, a warning says who can use it)."""
    import uvicorn

    if host not in LOOPBACK and not keyed:
        from ..log import say

        say(f"warning: serving on {host} without an API key: anyone who can reach this address can use the model "
            f"(--api-key KEY or $LORAKIT_API_KEY)")
    try:
        uvicorn.Server(server_config(app, host, port)).run()
    except OSError as exc:
        raise LorakitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
