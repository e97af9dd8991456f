"""The imgrec service: a web page and a JSON API over ONNX Runtime. Torch-free.

    POST /v1/predict         one image: multipart field `file`, or the raw image as the body
    POST /v1/predict/batch   several images: multipart fields `files` (or `file`)
    GET  /v1/model           what is served: name, classes, input size, batching
    GET  /healthz            liveness (always open, answers under any load)
    GET  /readyz             readiness: model loaded, engine alive, not shedding
    GET  /metrics            Prometheus text
    GET  /docs               OpenAPI (Swagger UI served locally, no CDN)
    GET  /                   the web page (static/, no CDN)

Every error is JSON {"error": {"code", "message"}}: uploads over the size limit get 413 before
their body is read, bytes that are no image 415, decompression bombs 413, corrupt or truncated
images 422, a body slower than --body-timeout 408, a missing or wrong API key 401, and a full
server 503 with Retry-After at once (overload is refused, not queued). Decoding runs in worker
threads (bounded), inference in the micro-batcher's lanes (one thread and one ONNX Runtime
session each): the event loop only moves bytes.

The pieces: config (ServeConfig), service (the model, a dependency), routes (the routers),
uploads (reading forms and raw bodies), schemas (the bodies, errors included, as pydantic
models), errors (the handlers), middleware (upload limits, API key, metrics), auth (the keys).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .auth import require_key
from .config import CONFIG_ENV, ServeConfig, available_cores
from .errors import ERROR_HANDLERS, UploadTooLarge, error_response
from .metrics import Metrics
from .middleware import ApiKeyAuth, RequestMetrics, UploadLimit
from .routes import PROTECTED, ROUTERS, STATIC
from .schemas import error_responses
from .service import Service
from .uploads import describe_forms

# the names this module has always offered stay importable from here
__all__ = ["CONFIG_ENV", "STATIC", "RequestMetrics", "ServeConfig", "Service", "UploadLimit",
           "UploadTooLarge", "available_cores", "create_app", "create_app_from_env",
           "error_response"]

log = logging.getLogger("imgrec.serve")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Log what is served; at shutdown, drain the micro-batcher before the process exits."""
    service: Service = app.state.service
    log.info("serving %s (%s) with %d inference lane(s) of %d ONNX Runtime thread(s)",
             service.name, service.onnx_file.name, service.batcher.lanes,
             service.config.lane_threads)
    yield
    await service.aclose()


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """Build the app; loads the model now, so a broken bundle fails at startup, not later."""
    config = config or ServeConfig()
    metrics = Metrics()
    service = Service(config, metrics)
    app = FastAPI(
        title="imgrec",
        summary=f"Image classification with {service.name}",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        exception_handlers=ERROR_HANDLERS,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.auth = ApiKeyAuth(None, config.api_keys, metrics) if config.api_keys else None
    for router in ROUTERS:
        if config.api_keys and router in PROTECTED:  # declared in /openapi.json, and checked
            app.include_router(router, dependencies=[Security(require_key)],
                               responses=error_responses(401, non_json=True))
        else:
            app.include_router(router)
    _describe_forms(app, config)
    _mount_docs(app)  # before /static, which would otherwise shadow /static/swagger
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_middleware(app, config, service)
    return app


def _describe_forms(app: FastAPI, config: ServeConfig) -> None:
    """/openapi.json as FastAPI builds it, then told which form fields a request needs."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            describe_forms(build(), config.max_files)  # build() caches it in openapi_schema
        return app.openapi_schema

    app.openapi = openapi


class JsonCors(CORSMiddleware):
    """Starlette's CORS, whose refused preflight answers in the API's error schema (a JSON
    400 `bad_input`), not plain text, like every other error the server sends."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "content-type")}
        return error_response(400, "bad_input", f"{response.body.decode()} (this server "
                              "allows the origins it was started with: --cors-origin)", headers)


def _add_middleware(app: FastAPI, config: ServeConfig, service: Service) -> None:
    """Outermost first: CORS (only with --cors-origin), metrics, the API key (before any of
    the body is read), the upload limits."""
    metrics = service.metrics
    # metrics label each known path; routers are listed apart (FastAPI may include them lazily)
    routes = {r.path for r in [*app.routes, *(r for x in ROUTERS for r in x.routes)]
              if hasattr(r, "path")}
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_bytes, metrics=metrics,
                       body_timeout=config.body_timeout_s,
                       buffer_bytes=config.upload_buffer_bytes, on_shed=service.note_shed)
    if config.api_keys:
        app.add_middleware(ApiKeyAuth, keys=config.api_keys, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    if config.cors_origins:
        app.add_middleware(JsonCors, allow_origins=config.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)


#: the /docs page: Swagger UI, started by static/docs.js, which fetches /openapi.json with the
#: API key the web page keeps (asking for it when the server answers 401)
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgrec API</title>
<link rel="stylesheet" href="{css}">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js}"></script>
<script src="/static/key.js"></script>
<script src="/static/docs.js"></script>
</body>
</html>
"""
CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package when installed (offline machines get a
    working /docs); else from a CDN."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/static/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
        js, css = "/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"
    else:
        js, css = f"{CDN}/swagger-ui-bundle.js", f"{CDN}/swagger-ui.css"
    page = DOCS_PAGE.format(js=js, css=css)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def _version() -> str:
    from .._version import __version__

    return __version__


def create_app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the config comes from $IMGREC_SERVE_CONFIG."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    return create_app(ServeConfig.from_env())
