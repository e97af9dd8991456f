"""The API's bodies as pydantic models. FastAPI checks every answer against them and publishes
them in /openapi.json (components/schemas), the error bodies included, so a client can be
generated from the schema instead of from reading this code."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    """Exactly these fields (additionalProperties: false in the schema): the API's JSON never
    carries more than it documents."""

    model_config = ConfigDict(extra="forbid")


# -- errors -----------------------------------------------------------------------------------
class ErrorDetail(_Body):
    code: str = Field(description="what went wrong, for programs: the table below each status",
                      examples=["unsupported_media_type"])
    message: str = Field(description="what went wrong and what to do, for people",
                         examples=["the bytes are not an image. Send a JPEG or PNG"])


class ErrorResponse(_Body):
    """Every error the server answers, whatever its status: {"error": {"code", "message"}}."""

    error: ErrorDetail


#: When each status happens, and with which `code` (the docs show this under each route).
ERROR_WHEN: dict[int, str] = {
    400: "`bad_input`: empty body or file, no `file`/`files` field, text where a file belongs, "
         "too many files or fields, malformed multipart; `bad_request`: a malformed "
         "Content-Length",
    401: "`unauthorized`: the server has an API key and the request carries no "
         "`Authorization: Bearer KEY` header with one of its keys (answered with "
         "`WWW-Authenticate: Bearer`)",
    408: "`request_timeout`: the request body did not arrive within the server's body timeout "
         "(a slow or stalled client); the connection is closed",
    413: "`upload_too_large`: the body is over the upload limit (refused from Content-Length "
         "before it is read, or as soon as a chunked body passes it); `image_too_large`: more "
         "pixels than the limit (decompression bombs are refused from the header)",
    415: "`unsupported_media_type`: the bytes are no image format the server reads (the name "
         "and the Content-Type are not trusted)",
    422: "`unreadable_image`: a corrupt or truncated image; `extreme_aspect_ratio`: an image "
         "far longer than wide (or the reverse), refused from its header; `invalid_request`: "
         "a bad query parameter (`top_k=0`)",
    500: "`internal_error`: a bug in the server (still answered as JSON)",
    503: "`overloaded`: the server holds as many images (or upload bytes) as it may, refused "
         "at once; `timed_out`: the image waited past the server's timeout without being run; "
         "`unavailable`: the inference thread has stopped. Each comes with `Retry-After`",
}
#: the 503 of the health routes, which are never overloaded
UNAVAILABLE = "`unavailable`: the inference thread has stopped"
NOT_READY = ("`not_ready`: the inference thread has stopped, the queue is full or the server "
             "refused a request in the last second (with `Retry-After`)")


def error_responses(*statuses: int, notes: dict[int, str] | None = None,
                    non_json: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status it can answer, with the error schema. `notes`
    replace the generic text where a route answers a status more narrowly. For a `non_json`
    route (a page, plain text) FastAPI would file the error model under the route's own media
    type; errors are JSON whatever the route serves, so there they are declared explicitly."""
    notes = notes or {}
    ref = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}  # the JSON routes' model
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorResponse} if not non_json else {
            "content": {"application/json": {"schema": ref}}}
        out[s]["description"] = notes.get(s, ERROR_WHEN[s])
        if s in ERROR_HEADERS:
            out[s]["headers"] = ERROR_HEADERS[s]
    return out


#: the headers that come with an error status, every time
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`: the scheme the server wants",
                               "required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before trying again",
                          "required": True, "schema": {"type": "integer", "minimum": 0}}},
}


# -- predictions ------------------------------------------------------------------------------
class Prediction(_Body):
    label: str = Field(description="the class name", examples=["tiger cat"])
    index: int = Field(description="the class's position in GET /v1/model `labels`")
    probability: float = Field(description="softmax probability, 0..1")


class PredictResponse(_Body):
    model: str = Field(description="the served model's name")
    predictions: list[Prediction] = Field(description="top-k labels, most probable first")
    elapsed_ms: float = Field(description="server time for this request, in milliseconds")


class ImageError(_Body):
    """Why one image of a batch got no predictions (the others are unaffected)."""

    code: str = Field(examples=["unsupported_media_type"])
    message: str
    status: int = Field(description="the HTTP status this image alone would have got",
                        examples=[415])


class BatchPrediction(_Body):
    filename: str = Field(description="the upload's file name, or `#i` when it had none")
    predictions: list[Prediction]


class BatchFailure(_Body):
    filename: str
    error: ImageError


class BatchResponse(_Body):
    model: str
    results: list[BatchPrediction | BatchFailure] = Field(
        description="one entry per uploaded file, in upload order")
    elapsed_ms: float


# -- the model and the process ----------------------------------------------------------------
class ModelInfo(_Body):
    model: str = Field(description="the served model's name")
    architecture: str | None = Field(description="the network's registry name")
    classes: int = Field(description="how many labels")
    labels: list[str]
    input_size: int = Field(description="the network's input side, in pixels")
    channels: int = Field(description="1 (greyscale) or 3 (RGB)")
    preprocess: dict[str, Any] = Field(
        description="the bundle's preprocessing contract (resize, crop, mean, std, ...)")
    engine: Literal["onnxruntime", "pytorch"]
    onnx_file: str | None = Field(description="the ONNX file served, null under PyTorch")
    engine_threads: int
    max_batch: int
    max_wait_ms: float
    max_upload_bytes: int
    max_pixels: int
    max_files: int = Field(description="images per /v1/predict/batch request")
    max_queue: int = Field(description="images the server holds at once (decoding, waiting, "
                                       "inferring); past it requests are answered 503")
    timeout_ms: float = Field(description="the longest an image waits once uploaded; past it "
                                          "the request is answered 503")


class Health(_Body):
    status: Literal["ok"]
    model: str


class Readiness(_Body):
    status: Literal["ready"]
    model: str
    queue_depth: int = Field(description="images held now")
    max_queue: int = Field(description="images the server holds at most")
