"""The HTTP routes, as routers: /v1/predict and /v1/predict/batch (uploads), /v1/model and
/metrics (the model and the process), /healthz and /readyz (health, always open), / (the web
page). `PROTECTED` are the routers that need the API key when the server has one.

Every route takes the Service through a dependency, declares its answer as a pydantic model
(or its media type) and lists the errors it can answer, so /openapi.json is the whole contract.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from .errors import RETRY_AFTER, error_response
from .schemas import (
    NOT_READY,
    UNAVAILABLE,
    BatchResponse,
    Health,
    ModelInfo,
    PredictResponse,
    Readiness,
    error_responses,
)
from .service import ServiceDep
from .uploads import (
    FORM_BODY,
    FORM_OR_RAW_BODY,
    OneImage,
    SeveralImages,
    Started,
    UploadRoute,
)

STATIC = Path(__file__).parent / "static"


async def _top_k(service: ServiceDep, top_k: Annotated[int | None, Query(
        ge=1, le=1000, description="labels per image (default: the server's, 5 unless "
                                   "configured; at most the number of classes)")] = None) -> int:
    return service.top_k(top_k)


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


TopK = Annotated[int, Depends(_top_k)]

# -- predictions ------------------------------------------------------------------------------
predict = APIRouter(prefix="/v1/predict", tags=["predict"], route_class=UploadRoute,
                    responses=error_responses(408, 500, 503))


@predict.post("", openapi_extra=FORM_OR_RAW_BODY,
              responses=error_responses(400, 413, 415, 422))
async def predict_one(started: Started, image: OneImage, k: TopK,
                      service: ServiceDep) -> PredictResponse:
    """Classify one image: multipart field `file`, or the raw image as the body (any
    content type: the format is sniffed from the bytes)."""
    predictions = await service.classify(image.data, k, image.name)
    return PredictResponse(model=service.name, predictions=predictions,
                           elapsed_ms=_ms_since(started))


@predict.post("/batch", openapi_extra=FORM_BODY, responses=error_responses(400, 413, 422, notes={
    413: "`upload_too_large`: the body is over the upload limit (an image too large to decode "
         "is reported in its own entry of `results`)",
    422: "`invalid_request`: a bad query parameter (`top_k=0`)"}))
async def predict_batch(started: Started, uploads: SeveralImages, k: TopK,
                        service: ServiceDep) -> BatchResponse:
    """Classify several images (multipart fields `files`, or repeated `file`). Each image
    gets its predictions or its own error; the request succeeds as a whole."""
    results = await service.classify_each(uploads, k)
    return BatchResponse(model=service.name, results=results, elapsed_ms=_ms_since(started))


# -- the model and the process ----------------------------------------------------------------
info = APIRouter()


@info.get("/v1/model", tags=["model"], responses=error_responses(500))
async def model_info(service: ServiceDep) -> ModelInfo:
    """What is served: name, classes, input size, engine and limits."""
    return service.describe()


@info.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
          responses={200: {"description": "Prometheus text exposition format"},
                     **error_responses(500, non_json=True)})
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text: requests, latency histogram, batch sizes, errors."""
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


# -- health: open even when the server has an API key ----------------------------------------
health = APIRouter(tags=["ops"])


@health.get("/healthz", response_model=Health,
            responses=error_responses(500, 503, notes={503: UNAVAILABLE}))
async def healthz(service: ServiceDep) -> Health | JSONResponse:
    """Liveness: ok while the inference thread runs, however loaded the server is."""
    if not service.batcher.alive:
        return error_response(503, "unavailable", "the inference thread has stopped",
                              {"Retry-After": RETRY_AFTER})
    return Health(status="ok", model=service.name)


@health.get("/readyz", response_model=Readiness,
            responses=error_responses(500, 503, notes={503: NOT_READY}))
async def readyz(service: ServiceDep) -> Readiness | JSONResponse:
    """Readiness: the model is loaded, the inference thread runs and the server is not
    refusing requests (a load balancer sends traffic elsewhere while this answers 503)."""
    why = service.not_ready()
    if why is not None:
        return error_response(503, "not_ready", why, {"Retry-After": RETRY_AFTER})
    return Readiness(status="ready", model=service.name, queue_depth=service.admission.depth,
                     max_queue=service.admission.limit)


# HEAD too: load balancers and uptime checkers (HAProxy's default `option httpchk`, curl -I)
# probe with it; the status is the GET's, the body is left out by the server
for _path, _probe in (("/healthz", healthz), ("/readyz", readyz)):
    health.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False,
                         response_model=None)


# -- the web page -----------------------------------------------------------------------------
page = APIRouter(tags=["page"], responses=error_responses(500, non_json=True))


@page.get("/", response_class=HTMLResponse,
          responses={200: {"description": "the web page (its scripts and styles: /static/)"}})
async def index() -> FileResponse:
    """The web page: choose, drop or paste an image and see its labels. No CDN."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


ROUTERS = (predict, info, health, page)
#: the routers that need the API key when the server has one
PROTECTED = (predict, info)
