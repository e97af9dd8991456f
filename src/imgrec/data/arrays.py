"""Datasets the caller already holds in Python: NumPy arrays `(x, y)` or a torch-style
Dataset of `(image, label)` items, turned into the same labelled splits as a folder or a
built-in (so `imgrec.train((x, y), ...)` runs the one training path). Torch-free: tensors
and PIL images are read through NumPy's array protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError
from .datasets import Dataset, Split, carve_splits


def as_uint8_images(x: Any) -> np.ndarray:
    """Images as uint8 N x C x H x W. Accepts N x H x W (greyscale), N x H x W x C and
    N x C x H x W with C in (1, 3); floats in [0, 1] are scaled to 0..255."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"images must be N x H x W or N x H x W x C, not shape {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise DataError(f"images of shape {x.shape}: need 1 or 3 channels")
    return np.ascontiguousarray(as_uint8(x))


def as_uint8(x: np.ndarray) -> np.ndarray:
    """Pixels of any dtype as uint8, scaled by what the whole array holds (`pixel_scale`):
    the one rule for arrays, in training and in predict."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    return np.clip(np.rint(x * (255.0 / pixel_scale(x))), 0, 255).astype(np.uint8)


#: the largest value that still reads as 0..1 (rounding), and the least a 0..255 set reaches
UNIT_SLACK, LEAST_BYTE_MAX = 1.01, 16.0


def pixel_scale(x: np.ndarray) -> float:
    """1.0 or 255.0: the scale of non-uint8 pixels. The whole set decides, and a set that
    is neither (standardised images, 16-bit ones) is refused: scaling it either way gave
    near-black or saturated images and a run that learned nothing, without a word."""
    if not x.size:
        return 255.0
    if not np.isfinite(x).all():
        raise DataError("the images hold NaN or infinite values", "fix or drop those images")
    low, high = float(x.min()), float(x.max())
    if low >= -0.01 and high <= UNIT_SLACK:
        return 1.0
    if low >= -0.5 and LEAST_BYTE_MAX <= high <= 255.5:
        return 255.0
    raise DataError(f"the pixel values run from {low:.4g} to {high:.4g}: give them in 0..1 or "
                    "0..255 (or uint8)",
                    "undo any standardisation (x * std + mean) or scaling before passing them; "
                    "imgrec normalises the pixels itself")


def _labels(y: Any, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names: names as given, else the labels' own values."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # Keras's to_categorical: one-hot rows
        if not (np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all()):
            raise DataError(f"the labels are a {y.shape[0]} x {y.shape[1]} table that is not "
                            "one-hot", "give one class per image: an index or a name")
        y = y.argmax(1)
    y = y.reshape(-1)
    if y.dtype.kind == "f":  # 0.0 / 1.0 are class indices; 0.5 is no class
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError("the labels are numbers that are not whole (e.g. "
                            f"{y[~(y == np.round(y))][:1].tolist() or y[:1].tolist()}): a "
                            "classifier needs class indices (0, 1, 2...) or class names")
        y = y.astype(np.int64)
    if y.dtype.kind in "iu" and classes is not None:
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"the labels run from {y.min()} to {y.max()} but there are "
                            f"{len(classes)} class names", "labels index the class names: "
                            f"0 to {len(classes) - 1}")
        return y.astype(np.int64), [str(c) for c in classes]
    try:
        values = sorted(set(y.tolist()))
    except TypeError:  # 3 and "cat" in one list
        kinds = sorted({type(v).__name__ for v in y.tolist()})
        raise DataError(f"the labels mix {' and '.join(kinds)} values",
                        "give every label as a class index or every one as a name") from None
    index = {v: i for i, v in enumerate(values)}
    return np.array([index[v] for v in y.tolist()], np.int64), [str(v) for v in values]


def dataset_from_arrays(x: Any, y: Any, classes: list[str] | None = None, name: str = "arrays",
                        val_fraction: float = 0.1, test_fraction: float = 0.1,
                        seed: int = 0) -> Dataset:
    """An in-memory Dataset from images and labels; validation and test carved, stratified."""
    images = as_uint8_images(x)
    labels, names = _labels(y, classes)
    if len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if len(names) < 2:
        raise DataError("the labels hold fewer than two classes")
    if images.shape[-1] != images.shape[-2]:
        raise DataError(f"images are {images.shape[-2]}x{images.shape[-1]}: in-memory images "
                        "must be square", "resize them, or save them as files in a folder")
    splits = {"train": Split(labels, images=images)}
    unheld = carve_splits(splits, val_fraction, test_fraction, seed)
    return Dataset(name, names, images.shape[1], splits, in_memory=True,
                   native_size=images.shape[-1], source=f"python:{name}", unheld=unheld)


def dataset_from_torch(data: Any, name: str = "dataset", val_fraction: float = 0.1,
                       test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A torch-style Dataset of (image, label) items, read once into memory (images as
    tensors, arrays or PIL images of one size); its `classes` attribute names the labels."""
    xs, ys = [], []
    for i in range(len(data)):
        image, label = _item(data, i)
        xs.append(np.asarray(image))
        ys.append(label)
    if not xs:
        raise DataError(f"{name}: the dataset is empty")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        some = ", ".join(map(str, sorted(shapes)[:3])) + ("..." if len(shapes) > 3 else "")
        raise DataError(f"{name}: the images differ in shape ({some})",
                        "resize them to one size (a transform), or save them as files in a "
                        "folder, which imgrec resizes")
    x = np.stack(xs)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # PIL images / H x W x C arrays
    classes = getattr(data, "classes", None)
    return dataset_from_arrays(x, np.array(ys), list(classes) if classes else None, name,
                               val_fraction, test_fraction, seed)


def _item(data: Any, i: int) -> tuple[Any, Any]:
    """Item i of a torch-style Dataset as (image, label), the label a plain value."""
    try:
        item = data[i]  # once: a Dataset decodes and transforms on every call
        image, label = item[0], item[1]
    except (TypeError, IndexError, KeyError):
        raise DataError(f"cannot read item {i} of a {type(data).__name__} as (image, label)",
                        "give a tuple (x, y) of arrays, or a Dataset whose items are "
                        "(image, label) pairs") from None
    if hasattr(label, "item") and getattr(label, "ndim", 0) == 0:
        label = label.item()  # a 0-d tensor or NumPy number
    if not isinstance(label, str | int | float | np.integer | np.floating) or \
            isinstance(label, bool):
        shape = getattr(label, "shape", None)
        raise DataError(f"item {i}'s label is a {type(label).__name__}"
                        f"{f' of shape {tuple(shape)}' if shape is not None else ''}, not a class",
                        "for arrays pass a tuple (x, y), not a list [x, y]; a Dataset's items "
                        "are (image, label) pairs")
    return image, label
