"""One error schema for every answer that is not a success: {"error": {"code", "message"}},
never a traceback, never FastAPI's own {"detail": ...}. Each error is counted by its code."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImgrecError
from .schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("imgrec.serve")

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}


class ApiError(StarletteHTTPException):
    """An error raised while the request body is read. FastAPI passes an HTTPException from
    body parsing on as it is and turns any other exception into its generic 400, so upload
    errors are these, carrying the API's own code."""

    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(status_code, message)
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


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The error body, built from its documented model so the two cannot drift apart."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status)


def _counted(request: Request, status: int, code: str, message: str) -> JSONResponse:
    request.app.state.metrics.errors.labels(code).inc()
    return error_response(status, code, message)


async def imgrec_error(request: Request, exc: ImgrecError) -> JSONResponse:
    """A user's mistake (bad image, bad field): its own status and code."""
    return _counted(request, exc.http_status, exc.code, str(exc))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing (404, 405) and body errors, in the API's schema instead of {"detail": ...}."""
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    resp = _counted(request, exc.status_code, code, str(exc.detail))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a bad query parameter) as one readable message."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return _counted(request, 422, "invalid_request", "; ".join(parts) or "invalid request")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, still answered as JSON."""
    log.exception("internal error")
    return _counted(request, 500, "internal_error", f"{type(exc).__name__}: {exc}")


ERROR_HANDLERS = {
    ImgrecError: imgrec_error,
    StarletteHTTPException: http_error,
    RequestValidationError: validation_error,
    Exception: internal_error,
}
