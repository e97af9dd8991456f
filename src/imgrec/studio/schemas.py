"""The studio API's bodies (pydantic); errors are serve's ErrorResponse."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Name(_Body):
    name: str = Field(description="letters, digits, spaces, '_', '-', '.'; at most 100",
                      examples=["pets"])


class ClassInfo(_Body):
    name: str
    count: int
    images: list[str] = Field(description="file names (content hashes), for "
                                          "GET .../classes/{C}/images/{file}")


class Project(_Body):
    name: str
    classes: list[ClassInfo]
    has_model: bool


class PhotoWarning(_Body):
    path: str = Field(description="CLASS/FILE within the project's data")
    kind: str = Field(description="imgrec doctor's kind: tiny, rotated, near_duplicate...")
    detail: str


class Rejected(_Body):
    filename: str
    error: str


class AddedImages(_Body):
    added: int = Field(description="images stored")
    duplicates: int = Field(description="images already in the class (same content)")
    rejected: list[Rejected] = Field(description="files that are no usable image, not stored")


class TrainRequest(_Body):
    backbone: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"] = \
        "efficientnet_lite0"
    # strict: `true` is no number of epochs (lax mode read it as 1)
    epochs: int | None = Field(None, ge=1, le=1000, strict=True)
    augment_views: int = Field(0, ge=0, le=16, strict=True)
    val_fraction: float = Field(0.34, ge=0.05, le=0.5)


class TrainState(_Body):
    state: Literal["idle", "running", "done", "failed"]
    progress: float = Field(ge=0, le=1)
    val_accuracy: float | None
    message: str
    seconds: float | None = Field(None, description="how long the last run took")
    validation: dict[str, Any] | None = Field(
        None, description="after a training: `labels`, `confusion_matrix` (rows: true class) "
                          "and `per_class_accuracy` on the validation photos (null for a "
                          "class without one)")


class Served(_Body):
    project: str = Field(description="the project whose model now answers POST /v1/predict")
