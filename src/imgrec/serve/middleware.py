"""ASGI middleware: the upload limits (enforced before FastAPI sees a byte), the API key
(checked before the body is read) and request metrics (every answer counted by route and
status, errors from the middleware included)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import anyio

from .errors import RETRY_AFTER, BodyTimeout, Overloaded, UploadTooLarge, error_response
from .metrics import Metrics


class UploadLimit:
    """A body announced over the limit is refused (413) before any of it is read; a body
    without Content-Length (chunked) is counted while it streams in and refused as soon as it
    passes the limit, so no upload ever costs more memory than the limit.

    A body must arrive within `body_timeout` seconds (408 and the connection closed past it),
    so slow clients cannot hold the server; and the bodies held at once, all requests
    together, stay under `buffer_bytes` (503 past it). The budget counts bytes as they arrive,
    not as announced, so a thousand trickling connections hold almost nothing and cannot
    starve normal uploads, while a burst of large ones is refused instead of exhausting memory.
    """

    def __init__(self, app, max_bytes: int, metrics: Metrics | None = None,
                 body_timeout: float | None = None, buffer_bytes: int | None = None,
                 on_shed: Callable[[str], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout
        self.buffer_bytes = buffer_bytes
        self.on_shed = on_shed
        self.buffered = 0  # bytes of request bodies held now (the event loop's only)

    def _message(self, size: str) -> str:
        return (f"the upload ({size}) is over the limit of {self.max_bytes:,} bytes; "
                "send a smaller image")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            refusal = self._refuse_announced(length)
            if refusal is not None:
                return await refusal(scope, receive, send)
        held = [0]  # this request's bytes in the shared budget, given back when it is answered
        try:
            return await self.app(scope, self._counting(receive, held), send)
        finally:
            self.buffered -= held[0]

    def _refuse_announced(self, length: bytes):
        """The answer to a Content-Length that is malformed or over the limit, else None."""
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            return error_response(400, "bad_request", "malformed Content-Length")
        if n <= self.max_bytes:
            return None
        if self.metrics:
            self.metrics.errors.labels(UploadTooLarge.code).inc()
        resp = error_response(413, UploadTooLarge.code, self._message(f"{n:,} bytes"))
        resp.headers["connection"] = "close"
        return resp

    def _counting(self, receive, held: list[int]):
        """`receive` that raises UploadTooLarge once the body passes the limit, BodyTimeout
        once it is late and Overloaded when the budget is spent (HTTPExceptions, so FastAPI's
        body parsing passes them on as the 413, 408 and 503 they are)."""
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout
        state = {"received": 0, "done": False}

        async def limited_receive():
            if state["done"]:  # the body is in: later receives wait for a disconnect
                return await receive()
            msg = await self._receive_by(receive, deadline)
            if msg["type"] == "http.request":
                n = len(msg.get("body", b""))
                state["received"] += n
                if state["received"] > self.max_bytes:
                    raise UploadTooLarge(self._message(f"over {state['received']:,} bytes "
                                                       "so far"))
                self._hold(n, held)
                state["done"] = not msg.get("more_body", False)
            else:
                state["done"] = True
            return msg

        return limited_receive

    async def _receive_by(self, receive, deadline: float | None):
        if deadline is None:
            return await receive()
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                return await receive()
        except TimeoutError:
            raise BodyTimeout(self.body_timeout or 0) from None

    def _hold(self, n: int, held: list[int]) -> None:
        """Count n more body bytes in the shared budget, or refuse the request (503). A
        request alone is never refused: the upload limit bounds it."""
        others = self.buffered - held[0]
        if self.buffer_bytes is not None and others and self.buffered + n > self.buffer_bytes:
            if self.on_shed is not None:
                self.on_shed("upload_buffer_full")
            refusal = Overloaded("the server is reading as many uploads as it may hold; retry "
                                 "in a moment")
            refusal.headers = {"Retry-After": RETRY_AFTER, "Connection": "close"}
            raise refusal
        self.buffered += n
        held[0] += n


class ApiKeyAuth:
    """With API keys set, every route but the health checks, the web page and its static
    files (and the /docs shell, which asks for the key) needs `Authorization: Bearer KEY`:
    401 before the body is read. Keys are compared in constant time, all of them."""

    OPEN = frozenset({"/healthz", "/readyz", "/", "/docs", "/favicon.ico"})

    def __init__(self, app, keys: list[str], metrics: Metrics | None = None):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.metrics = metrics

    def is_open(self, path: str) -> bool:
        return path in self.OPEN or path.startswith("/static/")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.is_open(scope.get("path", "")):
            problem = self.problem(dict(scope.get("headers") or []).get(b"authorization"))
            if problem is not None:
                if self.metrics:
                    self.metrics.errors.labels("unauthorized").inc()
                resp = error_response(401, "unauthorized", problem,
                                      {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)

    def problem(self, header: bytes | str | None) -> str | None:
        """Why the Authorization header does not open the API (None: it does)."""
        if isinstance(header, str):
            header = header.encode("latin-1", "replace")
        scheme, _, token = (header or b"").strip().partition(b" ")
        if not header or scheme.lower() != b"bearer" or not token.strip():
            return "this server needs an API key: send the header `Authorization: Bearer KEY`"
        token = token.strip()
        matches = [hmac.compare_digest(token, key) for key in self.keys]  # every key, always
        return None if any(matches) else "the API key is not valid"


class RequestMetrics:
    """Count every answer by route and status, and time it."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _endpoint(self, path: str) -> str:
        """A bounded label set: known routes, /static, everything else as `other`."""
        if path in self.routes:
            return path
        return "/static" if path.startswith("/static/") else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self._endpoint(scope.get("path", ""))
        status = {"code": 500}
        start = time.perf_counter()

        async def send_spy(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_spy)
        finally:
            self.metrics.requests.labels(endpoint, scope.get("method", ""),
                                         str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
