"""Small generators of test data: IDX files, pixel CSVs, broken images."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """An IDX file of unsigned bytes (MNIST's format)."""
    arr = np.ascontiguousarray(arr, np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def digit_images(labels: np.ndarray, side: int = 28, seed: int = 0) -> np.ndarray:
    """Learnable light-on-dark 'digits': a bright bar whose position encodes the label."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 30, (len(labels), side, side)).astype(np.uint8)
    n_cls = int(labels.max()) + 1
    for i, y in enumerate(labels):
        top = int(y) * (side - 3) // max(1, n_cls - 1) if n_cls > 1 else 0
        x[i, top : top + 3, 4:-4] = 230
    return x


def write_fake_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
    """<root>/mnist/ with the four canonical IDX files of a tiny, learnable fake MNIST."""
    folder = root / "mnist"
    ytr = np.arange(n_train) % 10
    yte = np.arange(n_test) % 10
    write_idx(folder / "train-images-idx3-ubyte", digit_images(ytr, seed=1), gz)
    write_idx(folder / "train-labels-idx1-ubyte", ytr, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", digit_images(yte, seed=2), gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", yte, gz)
    return folder


def write_pixel_csv(path: Path, labels: list[int], side: int = 28, seed: int = 0) -> Path:
    """Sign-Language-MNIST layout: label,pixel1..pixelN."""
    y = np.asarray(labels)
    x = digit_images(y, side, seed).reshape(len(y), -1)
    lines = ["label," + ",".join(f"pixel{i + 1}" for i in range(side * side))]
    lines += [f"{lab}," + ",".join(map(str, row)) for lab, row in zip(y, x, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def truncated_jpeg(path: Path, keep: int = 400) -> Path:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    img.save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:keep])
    return path


_TRAINED: dict[str, Path] = {}


def trained_shapes(tmp_path_factory, **options) -> Path:
    """A bundle trained once per session on the generated shapes folder (shared by the
    evaluate and predict tests, so each file does not train its own)."""
    if "shapes" not in _TRAINED:
        from conftest import make_shapes_dataset

        from imgrec.training.api import train

        base = tmp_path_factory.mktemp("trained-shapes")
        data = make_shapes_dataset(base / "shapes", per_class=40)
        result = train(str(data), model="fast-cnn", epochs=3, image_size=32, batch_size=16,
                       augment="none", workers=0, quiet=True, tensorboard=False,
                       out=str(base / "bundle"), **options)
        assert result.test_metrics["accuracy"] >= 0.75, result.history
        _TRAINED["shapes"] = base
    return _TRAINED["shapes"]


def cifar_records(n: int, seed: int = 0, classes: int = 10) -> bytes:
    """n CIFAR-10 binary records (label byte + R, G, B planes of 32x32): learnable, the label
    sets which third of the image is bright in which channel."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.uint8)
    rng.shuffle(labels)
    pixels = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    for i, y in enumerate(labels):
        pixels[i, y % 3, (y // 3) * 8 : (y // 3) * 8 + 8] = 220
    return np.concatenate([labels[:, None], pixels.reshape(n, -1)], 1).tobytes()


def write_cifar(root: Path, batches: tuple[int, ...] = (1, 2, 3, 4, 5), test: bool = True,
                n: int = 20, layout: str = "cifar-10-batches-bin") -> Path:
    """<root>/cifar10/<layout>/ with the given data_batch_N.bin files (n records each) and
    test_batch.bin; layout "" puts the files directly in <root>/cifar10/."""
    folder = root / "cifar10" / layout if layout else root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for i in batches:
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(n, seed=i))
    if test:
        (folder / "test_batch.bin").write_bytes(cifar_records(n, seed=99))
    return folder
