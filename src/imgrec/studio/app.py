"""The studio app: serve's FastAPI stack (error handlers, upload limits, metrics) with the
studio's routers and page, and `imgrec studio`'s server."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .._version import __version__
from ..serve.app import _mount_docs
from ..serve.config import ServeConfig
from ..serve.errors import ERROR_HANDLERS
from ..serve.metrics import Metrics
from ..serve.middleware import UploadLimit
from ..serve.routes import STATIC as SERVE_STATIC
from .routes import STATIC, Models, api, page, served
from .store import Store
from .trainer import Trainer

#: a request may carry many photos at once (the page sends a folder in chunks)
LIMITS = ServeConfig(max_upload_mb=200.0, max_files=500, body_timeout_s=120.0)


def create_app(root: str | Path = "imgrec-studio") -> FastAPI:
    """The studio over the folder `root` (created if missing); projects found there are
    served as they are, an interrupted training reported as failed."""
    app = FastAPI(title="imgrec studio", version=__version__, exception_handlers=ERROR_HANDLERS,
                  summary="Teach an image classifier from the browser, on this machine",
                  docs_url=None, redoc_url=None)
    store = Store(root)
    app.state.store, app.state.trainer = store, Trainer(store)
    app.state.models, app.state.metrics = Models(store), Metrics()
    app.state.max_files = LIMITS.max_files  # the upload routes' form limit (UploadRoute)
    app.include_router(api)
    app.include_router(served)
    app.include_router(page)
    app.mount("/studio/static", StaticFiles(directory=STATIC), name="studio-static")
    _mount_docs(app)  # serve's /docs: Swagger UI from the local package, no CDN
    app.mount("/static", StaticFiles(directory=SERVE_STATIC), name="static")
    app.add_middleware(UploadLimit, max_bytes=LIMITS.max_upload_bytes,
                       metrics=app.state.metrics, body_timeout=LIMITS.body_timeout_s,
                       buffer_bytes=LIMITS.upload_buffer_bytes)
    return app


def run_studio(root: str | Path, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn on the studio app, in this process (trainings are threads of it)."""
    import uvicorn

    from ..serve.launch import check_port

    check_port(host, port)
    uvicorn.run(create_app(root), host=host, port=port, log_level=log_level,
                server_header=False)
