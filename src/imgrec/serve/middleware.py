"""ASGI middleware: the upload limit (enforced before FastAPI sees a byte) and request
metrics (every answer counted by route and status, errors from the middleware included)."""

from __future__ import annotations

import time

from .errors import UploadTooLarge, error_response
from .metrics import Metrics


class UploadLimit:
    """A body announced over the limit is refused (413) before any of it is read; a body
    without Content-Length (chunked) is counted while it streams in and refused as soon as it
    passes the limit, so no upload ever costs more memory than the limit."""

    def __init__(self, app, max_bytes: int, metrics: Metrics | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

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
        return await self.app(scope, self._counting(receive), send)

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

    def _counting(self, receive):
        """`receive` that raises UploadTooLarge once the body passes the limit (an
        HTTPException, so FastAPI's body parsing passes it on as the 413 it is)."""
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self._message(f"over {received:,} bytes so far"))
            return msg

        return limited_receive


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
