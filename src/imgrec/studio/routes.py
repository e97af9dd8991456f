"""The studio's HTTP API under /v1/studio/ and its page. Errors are serve's JSON errors
({"error": {"code", "message"}}), uploads are read by serve's form dependencies, and images
are decoded by the one safe decoder, in worker threads."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from ..bundle import ONNX_INT8_FILE, atomic_write_bytes, read_bundle
from ..contract import load_input
from ..export import ensure_int8
from ..predict import Predictor
from ..serve.schemas import ErrorResponse, Prediction, PredictResponse, error_responses
from ..serve.uploads import FORM_OR_RAW_BODY, OneImage, SeveralImages, Upload, UploadRoute
from .schemas import (
    AddedImages,
    ClassInfo,
    Name,
    PhotoWarning,
    Project,
    Served,
    TrainRequest,
    TrainState,
)
from .store import SERVED, Conflict, NotFound, Store
from .trainer import Trainer, TrainOptions

STATIC = Path(__file__).parent / "static"
#: the studio's own statuses (serve's ERROR_WHEN has no 404 or 409 of its own)
STUDIO_ERRORS = {
    404: {"model": ErrorResponse, "description": "`not_found`: no such project, class, image "
                                                 "or model"},
    409: {"model": ErrorResponse, "description": "`conflict`: the name exists, or the "
                                                 "project is training (or its model is being "
                                                 "quantized for an int8 download) already"}}
ERRORS = {**error_responses(400, 422, notes={
    400: "`bad_request`: an invalid project, class or file name (`..`, `/`, NUL, over 100 "
         "characters); `bad_input`: a missing or malformed form"}), 404: STUDIO_ERRORS[404]}
# UploadRoute: a raw image body (curl --data-binary, sent as a form) is the image, not a form
# for FastAPI to consume first (that answered 500 "Stream consumed"); forms under the limits
api = APIRouter(prefix="/v1/studio/projects", tags=["studio"], responses=ERRORS,
                route_class=UploadRoute)


def _store(request: Request) -> Store:
    return request.app.state.store


def _trainer(request: Request) -> Trainer:
    return request.app.state.trainer


StoreDep = Annotated[Store, Depends(_store)]
TrainerDep = Annotated[Trainer, Depends(_trainer)]


def _project(store: Store, name: str) -> Project:
    path = store.project(name)
    classes = [ClassInfo(name=c, count=len(f), images=f) for c, f in store.classes(name).items()]
    return Project(name=name, classes=classes, has_model=(path / "model" / "imgrec.json").is_file())


# -- projects ---------------------------------------------------------------------------------
@api.post("", status_code=201, responses={409: STUDIO_ERRORS[409]})
def create_project(body: Name, store: StoreDep) -> Project:
    """Create a project (an empty folder dataset)."""
    store.create_project(body.name)
    return _project(store, body.name)


@api.get("")
def list_projects(store: StoreDep) -> list[Project]:
    """Every project, with its classes and image counts."""
    return [_project(store, p) for p in store.projects()]


@api.get("/{project}")
def get_project(project: str, store: StoreDep) -> Project:
    return _project(store, project)


@api.delete("/{project}", status_code=204)
def delete_project(project: str, store: StoreDep) -> Response:
    """Move the project to DIR/.trash/ (nothing is erased)."""
    store.delete_project(project)
    return Response(status_code=204)


@api.post("/{project}/rename", responses={409: STUDIO_ERRORS[409]})
def rename_project(project: str, body: Name, store: StoreDep) -> Project:
    store.rename_project(project, body.name)
    return _project(store, body.name)


# -- classes and images -----------------------------------------------------------------------
@api.post("/{project}/classes", status_code=201, responses={409: STUDIO_ERRORS[409]})
def create_class(project: str, body: Name, store: StoreDep) -> Project:
    store.create_class(project, body.name)
    return _project(store, project)


@api.post("/{project}/classes/{cls}/rename", responses={409: STUDIO_ERRORS[409]})
def rename_class(project: str, cls: str, body: Name, store: StoreDep) -> Project:
    store.rename_class(project, cls, body.name)
    return _project(store, project)


@api.delete("/{project}/classes/{cls}", status_code=204)
def delete_class(project: str, cls: str, store: StoreDep) -> Response:
    """Delete a class: its images go to the project's trash."""
    store.delete_class(project, cls)
    return Response(status_code=204)


@api.post("/{project}/classes/{cls}/images", responses=error_responses(413, 415))
async def add_images(project: str, cls: str, uploads: SeveralImages,
                     store: StoreDep) -> AddedImages:
    """Add images (multipart, field `files` repeated). Each is decoded before it is kept;
    those that are no usable image are listed in `rejected` and not stored. When no file was
    usable the request fails as a whole, with the first file's error (415, 413 or 422)."""
    out = await anyio.to_thread.run_sync(store.add_images, project, cls, uploads)
    if out.error is not None and not out.added and not out.duplicates:
        raise out.error
    return AddedImages(added=out.added, duplicates=out.duplicates, rejected=out.rejected)


@api.get("/{project}/classes/{cls}/images/{filename}", response_class=FileResponse)
def get_image(project: str, cls: str, filename: str, store: StoreDep) -> FileResponse:
    return FileResponse(store.image(project, cls, filename))


@api.delete("/{project}/classes/{cls}/images/{filename}", status_code=204)
def delete_image(project: str, cls: str, filename: str, store: StoreDep) -> Response:
    """Move the image to DIR/<project>/trash/<class>/."""
    store.delete_image(project, cls, filename)
    return Response(status_code=204)


@api.delete("/{project}/trash", status_code=204)
def empty_trash(project: str, store: StoreDep) -> Response:
    store.empty_trash(project)
    return Response(status_code=204)


# -- training, testing, export ----------------------------------------------------------------
@api.post("/{project}/train", status_code=202, responses={409: STUDIO_ERRORS[409]})
def start_training(project: str, trainer: TrainerDep,
                   body: Annotated[TrainRequest | None, Body()] = None) -> TrainState:
    """Start training in the background (features mode on EfficientNet-Lite); 409 while the
    project trains already. Poll GET .../train for progress."""
    options = TrainOptions(**(body or TrainRequest()).model_dump())
    return TrainState(**vars(trainer.start(project, options)))


@api.get("/{project}/train")
def training_state(project: str, trainer: TrainerDep) -> TrainState:
    """The project's training: state, progress 0..1, validation accuracy, a message."""
    return TrainState(**vars(trainer.get(project)))


@api.get("/{project}/train/events", response_class=StreamingResponse,
         responses={200: {"content": {"text/event-stream": {}}}})
async def training_events(project: str, trainer: TrainerDep) -> StreamingResponse:
    """Server-sent events: the training state (GET .../train's body) each time it changes,
    until the run is over (done with its validation figures, failed, or idle)."""
    trainer.get(project)  # an unknown project is a 404 now, not an empty stream

    async def states():
        last, waited = None, 0
        while True:
            state = TrainState(**vars(trainer.get(project)))
            body = state.model_dump_json()
            if body != last:
                yield f"data: {body}\n\n"
                last = body
            over = state.state in ("failed", "idle") or (
                state.state == "done" and (state.validation is not None or waited > 120))
            if over:
                return
            waited += state.state == "done"
            await anyio.sleep(0.25)

    return StreamingResponse(states(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@api.post("/{project}/predict", responses=error_responses(413, 415))
async def predict(project: str, image: OneImage, request: Request) -> PredictResponse:
    """Classify one image (multipart field `file`) with the project's last good model; the
    same body as /v1/predict."""
    return await _classify(request, project, image)


async def _classify(request: Request, project: str, image: Upload) -> PredictResponse:
    started = time.perf_counter()
    predictor = await anyio.to_thread.run_sync(request.app.state.models.get, project)
    pixels = await anyio.to_thread.run_sync(load_input, image.data, predictor.contract, None,
                                            None, image.name)
    probs = await anyio.to_thread.run_sync(predictor.probabilities, pixels[None])
    top = [Prediction(**p.to_dict()) for p in predictor.top_k(probs, 5)[0]]
    return PredictResponse(model=project, predictions=top,
                           elapsed_ms=round((time.perf_counter() - started) * 1000, 2))


@api.post("/{project}/serve")
def serve_project(project: str, store: StoreDep) -> Served:
    """Make the project's model the one behind this studio's POST /v1/predict (remembered
    across restarts)."""
    _model_dir(store, project)
    atomic_write_bytes(store.root / SERVED, project.encode())
    return Served(project=project)


served = APIRouter(tags=["predict"], responses=ERRORS, route_class=UploadRoute)


@served.post("/v1/predict", openapi_extra=FORM_OR_RAW_BODY,
             responses=error_responses(413, 415))
async def predict_served(image: OneImage, request: Request, store: StoreDep) -> PredictResponse:
    """Classify one image with the served project's model (POST .../{P}/serve chose it):
    multipart field `file`, or the raw image as the body, as `imgrec serve`'s /v1/predict."""
    marker = store.root / SERVED
    if not marker.is_file():
        raise NotFound("no project is served yet", "POST /v1/studio/projects/{P}/serve first")
    return await _classify(request, marker.read_text(), image)


@api.get("/{project}/bundle.zip", response_class=Response,
         responses={200: {"content": {"application/zip": {}}}, 409: STUDIO_ERRORS[409]})
def bundle_zip(project: str, store: StoreDep, trainer: TrainerDep,
               int8: Annotated[bool, Query(description=(
                   "add model.int8.onnx, for `imgrec serve --int8` (about 2x the float32 "
                   "model's speed on a CPU): quantized on the first such download, calibrated "
                   "on the project's photos, then kept with the model"))] = False) -> Response:
    """The project's last good bundle (imgrec.json, model.onnx, weights...) as a zip."""
    model = _model_dir(store, project)
    if int8:
        with trainer.quantizing(project):
            ensure_int8(model)
        if not _fresh_int8(model):  # a training put a new model in place meanwhile
            raise Conflict(f"project {project!r} has a new model since the download began",
                           "download it again")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for f in sorted(model.rglob("*")):
            if f.is_file() and (int8 or f.name != ONNX_INT8_FILE):
                z.write(f, f.relative_to(model).as_posix())
    name = f"{project}-model{'-int8' if int8 else ''}.zip"
    return Response(buffer.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": attachment(name)})


def attachment(name: str) -> str:
    """A Content-Disposition for `name`: an ASCII fallback, and the name itself in RFC 5987's
    UTF-8 form (headers are Latin-1: a project called "猫" answered 500)."""
    from urllib.parse import quote

    plain = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def _fresh_int8(model: Path) -> bool:
    return read_bundle(model, need_weights=False).derived_current(ONNX_INT8_FILE)


@api.get("/{project}/warnings")
def warnings(project: str, store: StoreDep) -> list[PhotoWarning]:
    """`imgrec doctor`'s findings about single photos of the project (tiny, rotated, near
    duplicates, ...), which the page shows beside their thumbnails."""
    from ..doctor import scan
    from ..errors import DataError

    try:
        report = scan(store.project(project) / "data")
    except DataError:  # no photos yet
        return []
    return [PhotoWarning(path=i.path, kind=i.kind, detail=i.detail) for i in report.issues
            if i.path != "."]


@api.get("/{project}/report/{name:path}", response_class=FileResponse,
         responses={200: {"content": {"text/html": {}, "image/png": {}}}})
def evaluation_report(project: str, store: StoreDep, name: str = "index.html") -> FileResponse:
    """`imgrec evaluate --report` of the project's model on its validation photos (made on
    the first request after each training, in DIR/<P>/report/): the page and its figures."""
    report = store.project(project) / "report"
    model = _model_dir(store, project)
    index = report / "index.html"
    if not index.is_file() or index.stat().st_mtime < (model / "imgrec.json").stat().st_mtime:
        from ..report import build_report

        build_report(str(model), str(store.project(project) / "data"), report, split="val")
    path = (report / (name or "index.html")).resolve()
    if not path.is_file() or not path.is_relative_to(report.resolve()):
        raise NotFound(f"the report has no {name!r}", "open .../report/index.html")
    return FileResponse(path)


def _model_dir(store: Store, project: str) -> Path:
    model = store.project(project) / "model"
    if not (model / "imgrec.json").is_file():
        raise NotFound(f"project {project!r} has no model yet", "train it first")
    return model


class Models:
    """Each project's Predictor, reloaded when a training has put a new model in place."""

    def __init__(self, store: Store):
        self.store, self.loaded = store, {}

    def get(self, project: str) -> Predictor:
        model = _model_dir(self.store, project)
        stamp = (model / "imgrec.json").stat()
        key = (str(model), stamp.st_ino, stamp.st_mtime_ns)
        if self.loaded.get(project, (None,))[0] != key:
            self.loaded[project] = (key, Predictor.load(model, engine="onnx", threads=1))
        return self.loaded[project][1]


# -- the page ---------------------------------------------------------------------------------
page = APIRouter(include_in_schema=False)


@page.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/studio")


@page.get("/studio")
async def studio_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
