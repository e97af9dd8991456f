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

The pieces: config (ServeConfig), service (the model, a dependency), routes (the routers),
uploads (reading forms and raw bodies), schemas (the bodies, errors included, as pydantic
models), errors (the handlers), middleware (upload limit, metrics).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .config import CONFIG_ENV, ServeConfig, available_cores
from .errors import ERROR_HANDLERS, UploadTooLarge, error_response
from .metrics import Metrics
from .middleware import RequestMetrics, UploadLimit
from .routes import ROUTERS, STATIC
from .service import Service

# the names this module has always offered stay importable from here
__all__ = ["CONFIG_ENV", "STATIC", "RequestMetrics", "ServeConfig", "Service", "UploadLimit",
           "UploadTooLarge", "available_cores", "create_app", "create_app_from_env",
           "error_response"]

log = logging.getLogger("imgrec.serve")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Log what is served; at shutdown, drain the micro-batcher before the process exits."""
    service: Service = app.state.service
    log.info("serving %s (%s) with %d ONNX Runtime thread(s)", service.name,
             service.onnx_file.name, service.config.engine_threads)
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
    for router in ROUTERS:
        app.include_router(router)
    _mount_docs(app)  # before /static, which would otherwise shadow /static/swagger
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # metrics label each known path; routers are listed apart (FastAPI may include them lazily)
    routes = {r.path for r in [*app.routes, *(r for x in ROUTERS for r in x.routes)]
              if hasattr(r, "path")}
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
    from .._version import __version__

    return __version__


def create_app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the config comes from $IMGREC_SERVE_CONFIG."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    return create_app(ServeConfig.from_env())
