"""Reading uploads: a multipart form (`file`, `files`) or the raw image as the whole body.

The form fields are declared as FastAPI `File` parameters, so /openapi.json documents them.
The routes that take uploads use `UploadRoute`, whose request reads a form under the server's
limits and answers a malformed one in the API's error schema (400 `bad_input`; 413 past the
upload limit) where FastAPI alone would answer its generic 400. And only multipart/form-data
is a form here: any other body, curl's default application/x-www-form-urlencoded included, is
left unread for the raw-image path, as FastAPI's form parsing would swallow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, File, Request, Response, UploadFile
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, WithJsonSchema
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, one_line
from .errors import ApiError

#: A form field meant to carry a file. Typed to admit text as well, so that a text value
#: reaches the route and gets the API's 400 `bad_input` (FastAPI would answer its own 422);
#: documented as the file it should be.
FileField = Annotated[UploadFile | str, WithJsonSchema(TypeAdapter(UploadFile).json_schema())]
#: text fields a form may carry beside its files
EXTRA_FIELDS = 8

#: The body's fields are optional to FastAPI (a missing one is answered here, as 400
#: `bad_input`, not as FastAPI's 422), but the body itself is required.
FORM_BODY: dict[str, Any] = {"requestBody": {"required": True}}
#: ...and the one body FastAPI's parameters cannot declare: the image as the whole body, with
#: the schema FastAPI gives a file field.
FORM_OR_RAW_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"image/*": {
    "schema": {**TypeAdapter(UploadFile).json_schema(),
               "description": "the image's bytes as the whole body, any Content-Type (the "
                              "bytes decide the format)"}}}}}


def describe_forms(schema: dict[str, Any], max_files: int) -> None:
    """Make /openapi.json say what a form needs. FastAPI declares the file fields optional
    (so that a missing one reaches the route and gets the API's 400); a request still needs
    `file` in a /v1/predict form, and one or more `files` (or `file`) fields, at most
    `max_files`, in a batch."""
    def form(path: str) -> dict[str, Any] | None:
        content = schema["paths"].get(path, {}).get("post", {}).get("requestBody", {}).get(
            "content", {})
        ref = content.get("multipart/form-data", {}).get("schema", {}).get("$ref", "")
        return schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1])

    def present(prop: dict[str, Any], **limits: int) -> None:
        """The field's non-null variant (no null: a field sent is never null)."""
        kept = [x for x in prop.pop("anyOf", []) if x.get("type") != "null"]
        prop.update(kept[0] if kept else {}, **limits)

    one, batch = form("/v1/predict"), form("/v1/predict/batch")
    if one and "file" in one["properties"]:
        present(one["properties"]["file"])
        one["required"] = ["file"]
    if batch and {"files", "file"} <= set(batch["properties"]):
        for name in ("files", "file"):
            present(batch["properties"][name], minItems=1, maxItems=max_files)
            batch["properties"][name]["description"] = (
                f"{batch['properties'][name].get('description', '')} (`files` and `file` "
                f"together: at most {max_files})").strip()
        batch["anyOf"] = [{"required": ["files"]}, {"required": ["file"]}]


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _too_many(form: FormData, files: int) -> str | None:
    """Starlette's own refusal for a form over `files` files (or the text fields beside
    them), for a route whose limit is below the server's."""
    items = form.multi_items()
    n_files = sum(isinstance(v, StarletteUploadFile) for _, v in items)
    if n_files > files:
        return f"Too many files. Maximum number of files is {files}."
    if len(items) - n_files > files + EXTRA_FIELDS:
        return f"Too many fields. Maximum number of fields is {files + EXTRA_FIELDS}."
    return None


class UploadRequest(Request):
    """A request whose form is read under the server's limits, errors in the API's schema."""

    async def form(self, **_: Any) -> FormData:  # FastAPI may pass its own limits: ours rule
        if not is_multipart(self):
            return FormData()  # the body stays unread: it is the raw image
        state = self.app.state  # the studio states its own limit; a server its config's
        max_files = getattr(state, "max_files", None) or state.service.config.max_files
        try:
            return await super().form(max_files=max_files,
                                      max_fields=max_files + EXTRA_FIELDS)
        except ApiError:
            raise
        except StarletteHTTPException as e:  # starlette's MultiPartException, as a 400
            raise ApiError.of(InputError(f"cannot read the multipart form ({e.detail})")) \
                from None


class UploadRoute(APIRoute):
    """FastAPI's custom route class: hands the endpoint an UploadRequest, and notes when the
    route started, before FastAPI reads the upload (`elapsed_ms` counts the upload)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def upload_handler(request: Request) -> Response:
            request.state.started = time.perf_counter()
            return await handler(UploadRequest(request.scope, request.receive))

        return upload_handler


async def started(request: Request) -> float:
    """When the route started (UploadRoute), else now. (The dependencies here are
    coroutines: a plain function would cost each request a hop to the thread pool.)"""
    return getattr(request.state, "started", None) or time.perf_counter()


async def _read(item: UploadFile | str, field: str = "file") -> bytes:
    if isinstance(item, str):
        raise InputError(f"the `{field}` field must be a file upload, not text")
    return await item.read()


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes, and what messages call it (the form's file name, else
    "upload")."""

    data: bytes
    name: str = "upload"


#: a file name as messages show it: no control characters, at most this long
MAX_SHOWN_NAME = 80


def shown_name(filename: str | None) -> str:
    """The client's file name fit for a one-line message ("upload" when it gave none)."""
    name = one_line((filename or "").strip())
    if len(name) > MAX_SHOWN_NAME:
        name = name[: MAX_SHOWN_NAME - 3] + "..."
    return name or "upload"


async def one_image(
    request: Request,
    file: Annotated[FileField | None, File(
        description="the image (JPEG, PNG, GIF, BMP, TIFF, WebP or binary PPM/PGM: the bytes "
                    "decide, not the name); required in a multipart request")] = None,
) -> Upload:
    """The image: the form's `file`, or the whole body when the request is no form."""
    if not is_multipart(request):
        return Upload(await request.body())
    problem = _too_many(await request.form(), files=1)
    if problem:
        raise InputError(f"cannot read the multipart form ({problem})")
    if file is None:
        raise InputError("no `file` field in the multipart form",
                         "send the image as the form field `file`")
    return Upload(await _read(file), shown_name(getattr(file, "filename", None)))


async def several_images(
    request: Request,
    files: Annotated[list[FileField] | None, File(
        description="the images, one `files` field each")] = None,
    file: Annotated[list[FileField] | None, File(
        description="also accepted: the images as repeated `file` fields")] = None,
) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every image in a multipart batch, `files` first, then `file`."""
    if not is_multipart(request):
        raise InputError("a batch is a multipart/form-data request",
                         "send the images as repeated form fields `files`")
    items = [("files", f) for f in files or []] + [("file", f) for f in file or []]
    if not items:
        raise InputError("no `files` fields in the multipart form",
                         "send the images as repeated form fields `files`")
    return [(getattr(it, "filename", None) or f"#{i}", await _read(it, field))
            for i, (field, it) in enumerate(items)]


Started = Annotated[float, Depends(started)]
OneImage = Annotated[Upload, Depends(one_image)]
SeveralImages = Annotated[list[tuple[str, bytes]], Depends(several_images)]
