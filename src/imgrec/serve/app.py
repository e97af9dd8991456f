"""The imgrec service: a web page and a JSON API over ONNX Runtime. Torch-free.

    POST /v1/predict         one image: multipart field `file`, or the raw image as the body
    POST /v1/predict/batch   several images: multipart fields `files` (or `file`)
    GET  /v1/model           what is served: name, classes, input size, batching
    GET  /healthz            liveness
    GET  /metrics            Prometheus text
    GET  /docs               OpenAPI (Swagger UI served locally, no CDN)
    GET  /                   the web page (static/, no CDN)

Every error is JSON {"error": {"code", "message"}} with a 4xx status: uploads over the size
limit get 413 before their body is read, bytes that are no image 415, decompression bombs 413,
corrupt or truncated images 422. Decoding runs in worker threads (bounded), inference in the
micro-batcher's thread: the event loop only moves bytes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bundle import serving_onnx_path
from ..contract import load_input
from ..errors import BundleError, ImgrecError, InputError
from ..images import MAX_PIXELS
from ..predict import OnnxEngine, Predictor
from ..zoo import open_bundle
from .batching import MicroBatcher
from .metrics import Metrics

log = logging.getLogger("imgrec.serve")

STATIC = Path(__file__).parent / "static"
CONFIG_ENV = "IMGREC_SERVE_CONFIG"


class UploadTooLarge(InputError):
    """A request body over the upload limit."""

    http_status = 413
    code = "upload_too_large"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class ServeConfig:
    """Everything `imgrec serve` passes to each worker process (as JSON in the environment)."""

    model: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    threads: int | None = None  # ONNX Runtime intra-op threads (default: cores / workers)
    workers: int = 1
    max_pixels: int = MAX_PIXELS
    max_files: int = 32  # images per /v1/predict/batch request
    default_top_k: int = 5
    #: run the bundle in PyTorch when it has no model.onnx (set by `imgrec serve` after an
    #: export failed; a plain deployment never imports torch)
    torch_fallback: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def engine_threads(self) -> int:
        """ONNX Runtime threads per worker so that workers x threads <= cores."""
        return self.threads or max(1, available_cores() // max(1, self.workers))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        raw = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(raw)) if raw else cls()


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}


class UploadLimit:
    """ASGI middleware: a body announced over the limit is refused (413) before any of it is
    read; a body without Content-Length (chunked) is counted while it streams in and refused
    as soon as it passes the limit."""

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
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await error_response(400, "bad_request",
                                            "malformed Content-Length")(scope, receive, send)
            if n > self.max_bytes:
                if self.metrics:
                    self.metrics.errors.labels(UploadTooLarge.code).inc()
                resp = error_response(413, UploadTooLarge.code, self._message(f"{n:,} bytes"))
                resp.headers["connection"] = "close"
                return await resp(scope, receive, send)
        received = 0
        max_bytes = self.max_bytes
        message = self._message

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > max_bytes:
                    raise UploadTooLarge(message(f"over {received:,} bytes so far"))
            return msg

        return await self.app(scope, limited_receive, send)


class RequestMetrics:
    """ASGI middleware: count every answer by route and status, time it."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.routes else ("/static" if path.startswith("/static/")
                                                     else "other")
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


class Service:
    """The loaded model: bundle, ONNX engine, micro-batcher."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        bundle = open_bundle(config.model, need_weights=False)
        self.bundle = bundle
        self.onnx_file = serving_onnx_path(bundle)
        self.predictor = Predictor(bundle, engine=self._engine(bundle, config))
        self.batcher = MicroBatcher(self.predictor.probabilities, config.max_batch,
                                    config.max_wait_ms, metrics.on_batch)
        # Decoding a big photo holds tens of MB: bound how many decode at once.
        self.decode_limiter = anyio.CapacityLimiter(max(2, available_cores()
                                                        // max(1, config.workers)))
        self.name = bundle.name

    def _engine(self, bundle, config: ServeConfig):
        """ONNX Runtime on the exported file; PyTorch only for a network that cannot be
        exported (the CLI has said so in one line), and only where torch is installed."""
        if self.onnx_file.is_file():
            return OnnxEngine(bundle, config.engine_threads, self.onnx_file)
        hint = f"run `imgrec export {config.model or 'imagenet'}` first"
        if not config.torch_fallback:
            raise BundleError(f"{bundle.path}: no model.onnx to serve", hint)
        try:
            from ..predict import TorchEngine

            engine = TorchEngine(bundle, "cpu")
        except ModuleNotFoundError:
            raise BundleError(f"{bundle.path}: no model.onnx to serve, and PyTorch is not "
                              "installed to run it without one", hint) from None
        log.warning("%s has no model.onnx: serving it with PyTorch", bundle.path)
        return engine

    def describe(self) -> dict[str, Any]:
        c = self.bundle.preprocess
        return {
            "model": self.name,
            "architecture": self.bundle.architecture.get("name"),
            "classes": len(self.bundle.classes),
            "labels": self.bundle.classes,
            "input_size": c.input_size,
            "channels": c.channels,
            "preprocess": c.to_dict(),
            "engine": "onnxruntime" if self.predictor.engine.name == "onnx" else "pytorch",
            "onnx_file": self.onnx_file.name if self.predictor.engine.name == "onnx" else None,
            "engine_threads": self.config.engine_threads,
            "max_batch": self.config.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
            "max_upload_bytes": self.config.max_upload_bytes,
            "max_pixels": self.config.max_pixels,
            "max_files": self.config.max_files,
        }

    async def classify(self, data: bytes, top_k: int) -> list[dict[str, Any]]:
        """Bytes -> top-k predictions; raises ImgrecError (4xx) for bad images."""
        if not data:
            raise InputError("the request carries no image (empty body or file)",
                             "send the image as multipart field `file` or as the raw body")
        pixels = await anyio.to_thread.run_sync(
            load_input, data, self.predictor.contract, None, self.config.max_pixels,
            limiter=self.decode_limiter)
        probs = await self.batcher.infer(pixels)
        return [p.to_dict() for p in self.predictor.top_k(probs[None], top_k)[0]]


async def _form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files, max_fields=max_files + 8)
    except ImgrecError:
        raise
    except StarletteHTTPException as e:
        raise InputError(f"cannot read the multipart form ({e.detail})") from None


async def _upload_bytes(item: Any) -> bytes:
    if isinstance(item, UploadFile):
        return await item.read()
    raise InputError("the `file` field must be a file upload, not text")


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_BATCH_DOC = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array",
                                     "items": {"type": "string", "format": "binary"}}}}}},
    }
}


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """Build the app; loads the model now, so a broken bundle fails at startup, not later."""
    config = config or ServeConfig()
    metrics = Metrics()
    service = Service(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving %s (%s) with %d ONNX Runtime thread(s)", service.name,
                 service.onnx_file.name, config.engine_threads)
        yield
        # uvicorn has finished the in-flight requests by now: drain the batcher and stop.
        await anyio.to_thread.run_sync(service.batcher.close)

    app = FastAPI(
        title="imgrec",
        summary=f"Image classification with {service.name}",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.metrics = metrics

    # -- errors: one schema, never a traceback ------------------------------------------------
    @app.exception_handler(ImgrecError)
    async def _imgrec_error(request: Request, exc: ImgrecError):
        metrics.errors.labels(exc.code).inc()
        return error_response(exc.http_status, exc.code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        resp = error_response(exc.status_code, code, str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors.labels("invalid_request").inc()
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # a bug: still JSON
        log.exception("internal error")
        metrics.errors.labels("internal_error").inc()
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # -- API ---------------------------------------------------------------------------------
    top_k_query = Query(None, ge=1, le=1000,
                        description=f"labels per image (default {config.default_top_k}; at "
                                    f"most the number of classes, {len(service.bundle.classes)})")

    def _k(top_k: int | None) -> int:
        return min(top_k or config.default_top_k, len(service.bundle.classes))

    @app.post("/v1/predict", openapi_extra=_UPLOAD_DOC, tags=["predict"])
    async def predict(request: Request, top_k: int | None = top_k_query) -> dict[str, Any]:
        """Classify one image: multipart field `file`, or the raw image as the body (any
        content type: the format is sniffed from the bytes)."""
        start = time.perf_counter()
        if _is_multipart(request):
            form = await _form(request, 1)
            try:
                item = form.get("file")
                if item is None:
                    raise InputError("no `file` field in the multipart form",
                                     "send the image as the form field `file`")
                data = await _upload_bytes(item)
            finally:
                await form.close()
        else:
            data = await request.body()
        predictions = await service.classify(data, _k(top_k))
        return {"model": service.name, "predictions": predictions,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.post("/v1/predict/batch", openapi_extra=_BATCH_DOC, tags=["predict"])
    async def predict_batch(request: Request,
                            top_k: int | None = top_k_query) -> dict[str, Any]:
        """Classify several images (multipart fields `files`, or repeated `file`). Each image
        gets its predictions or its own error; the request succeeds as a whole."""
        start = time.perf_counter()
        if not _is_multipart(request):
            raise InputError("a batch is a multipart/form-data request",
                             "send the images as repeated form fields `files`")
        form = await _form(request, config.max_files)
        try:
            items = form.getlist("files") + form.getlist("file")
            if not items:
                raise InputError("no `files` fields in the multipart form",
                                 "send the images as repeated form fields `files`")
            uploads = [(getattr(it, "filename", None) or f"#{i}", await _upload_bytes(it))
                       for i, it in enumerate(items)]
        finally:
            await form.close()
        k = _k(top_k)

        async def one(name: str, data: bytes) -> dict[str, Any]:
            try:
                return {"filename": name, "predictions": await service.classify(data, k)}
            except ImgrecError as e:
                metrics.errors.labels(e.code).inc()
                return {"filename": name, "error": {"code": e.code, "message": str(e),
                                                    "status": e.http_status}}

        results: list[Any] = [None] * len(uploads)

        async def run(i: int, name: str, data: bytes) -> None:
            results[i] = await one(name, data)

        async with anyio.create_task_group() as tg:
            for i, (name, data) in enumerate(uploads):
                tg.start_soon(run, i, name, data)
        return {"model": service.name, "results": results,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.get("/v1/model", tags=["model"])
    async def model_info() -> dict[str, Any]:
        """What is served: name, classes, input size, engine and limits."""
        return service.describe()

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """Liveness: ok while the inference thread runs."""
        if not service.batcher.alive:
            return error_response(503, "unavailable", "the inference thread has stopped")
        return {"status": "ok", "model": service.name}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text: requests, latency histogram, batch sizes, errors."""
        return Response(metrics.render(), media_type=metrics.content_type)

    # -- the page and the docs, all served locally -------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    _mount_docs(app)  # before /static, which would otherwise shadow /static/swagger
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_bytes, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package when installed (offline machines get a
    working /docs); else FastAPI's default page, which loads Swagger UI from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/static/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
        js, css = "/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"
        favicon = "/static/favicon.svg"
    else:
        js = css = favicon = None

    @app.get("/docs", include_in_schema=False)
    async def docs():
        kwargs = {"swagger_js_url": js, "swagger_css_url": css,
                  "swagger_favicon_url": favicon} if js else {}
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                                   title="imgrec API", **kwargs)


def _version() -> str:
    from .. import __version__

    return __version__


def create_app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the config comes from $IMGREC_SERVE_CONFIG."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    return create_app(ServeConfig.from_env())

