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
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        scale = 255.0 if x.size and float(x.max()) <= 1.0 else 1.0
        x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _labels(y: Any, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names: names as given, else the labels' own values."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f":  # 0.0 / 1.0 are class indices; 0.5 is no class
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError("the labels are numbers that are not whole (e.g. "
                            f"{y[~(y == np.round(y))][:1].tolist() or y[:1].tolist()}): a "
                            "classifier needs class indices (0, 1, 2...) or class names")
        y = y.astype(np.int64)
    if y.dtype.kind in "iu" and classes is not None:
        return y.astype(np.int64), [str(c) for c in classes]
    values = sorted(set(y.tolist()))
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
        image, label = data[i][:2]
        xs.append(np.asarray(image))
        ys.append(int(label))
    if not xs:
        raise DataError(f"{name}: the dataset is empty")
    x = np.stack(xs)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # PIL images / H x W x C arrays
    classes = getattr(data, "classes", None)
    return dataset_from_arrays(x, np.array(ys), list(classes) if classes else None, name,
                               val_fraction, test_fraction, seed)
