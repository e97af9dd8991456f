"""One error schema for every answer that is not a success: {"error": {"code", "message"}},
never a traceback, a server path or an object's repr, never FastAPI's own {"detail": ...}.
Each error is counted by its code."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImgrecError
from .schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("imgrec.serve")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 413: "upload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}
#: how long a refused client should wait before it tries again, in seconds
RETRY_AFTER = "1"


class ApiError(StarletteHTTPException):
    """An error raised while the request body is read. FastAPI passes an HTTPException from
    body parsing on as it is and turns any other exception into its generic 400, so upload
    errors are these, carrying the API's own code."""

    def __init__(self, status_code: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code, message, headers)
        self.code = code

    @classmethod
    def of(cls, error: ImgrecError) -> ApiError:
        return cls(error.http_status, error.code, str(error))


class UploadTooLarge(ApiError):
    """A request body over the upload limit."""

    http_status = 413
    code = "upload_too_large"

    def __init__(self, message: str):
        super().__init__(self.http_status, self.code, message)


class Overloaded(ApiError):
    """503 at once: the server holds as many images (or upload bytes) as it may."""

    def __init__(self, message: str, code: str = "overloaded"):
        super().__init__(503, code, message, {"Retry-After": RETRY_AFTER})


class TimedOut(Overloaded):
    """503: the image waited past --timeout-ms; answered now rather than served late."""

    def __init__(self, timeout_ms: float):
        super().__init__(f"the server is too busy: the image waited over {timeout_ms:g} ms "
                         "without being run; retry later", "timed_out")


class BodyTimeout(ApiError):
    """408: the request body did not arrive within --body-timeout (a slow or stalled
    client); the connection is closed."""

    def __init__(self, seconds: float):
        super().__init__(408, "request_timeout", f"the request body did not arrive within "
                         f"{seconds:g} s; send it faster or in a smaller image",
                         {"Connection": "close"})


class Unauthorized(ApiError):
    """401: no API key, or not one of the server's."""

    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def _server_paths() -> list[str]:
    """Folders whose names a message must not show: the interpreter's, the package's, the
    working folder, home and the temporary folder (longest first)."""
    roots = {sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2]),
             os.getcwd(), str(Path.home()), tempfile.gettempdir()}
    return sorted((r.rstrip("/") for r in roots if r and r != "/"), key=len, reverse=True)


_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.S)
_FRAME = re.compile(r'File "[^"]*", line \d+(, in \S+)?')


def public(message: str) -> str:
    """A message fit for a client: object reprs, server paths and traceback lines removed
    (Pillow, for one, names the BytesIO it could not read)."""
    message = _TRACEBACK.sub("", message)
    message = _FRAME.sub("", message)
    message = _REPR.sub("the upload", message)
    message = _ADDRESS.sub("", message)
    for root in _server_paths():
        message = re.sub(re.escape(root) + r"[^\s'\"),;]*", "<server path>", message)
    return message.strip() or "error"


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body, built from its documented model so the two cannot drift apart."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=public(message)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _counted(request: Request, status: int, code: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    request.app.state.metrics.errors.labels(code).inc()
    return error_response(status, code, message, headers)


async def imgrec_error(request: Request, exc: ImgrecError) -> JSONResponse:
    """A user's mistake (bad image, bad field): its own status and code."""
    return _counted(request, exc.http_status, exc.code, str(exc))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing (404, 405) and body errors, in the API's schema instead of {"detail": ...}."""
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    return _counted(request, exc.status_code, code, str(exc.detail), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a bad query parameter) as one readable message."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return _counted(request, 422, "invalid_request", "; ".join(parts) or "invalid request")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as JSON that names only its type."""
    log.exception("internal error")
    return _counted(request, 500, "internal_error",
                    f"internal error ({type(exc).__name__}); the server's log has the details")


ERROR_HANDLERS = {
    ImgrecError: imgrec_error,
    StarletteHTTPException: http_error,
    RequestValidationError: validation_error,
    Exception: internal_error,
}
