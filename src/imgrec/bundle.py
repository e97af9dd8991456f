"""The model bundle: a directory that everything downstream of training reads.

    model.safetensors   weights (never pickle: loading a bundle runs no code)
    imgrec.json         format version, architecture, classes, preprocessing contract, summary,
                        and the size and SHA-256 of each model file ("files")
    model.onnx          optional, written by `imgrec export`; serving prefers it
    history.csv, curves.png, events.*   the training record

Checked, not trusted: reading a bundle verifies each recorded model file that is there
(size, then SHA-256), that every file imgrec.json names lies inside the bundle, and that the
class list matches the network's output (the architecture's num_classes, each ONNX file's
output shape; `imgrec.network.load_model` checks the PyTorch network's). Any mismatch is one
BundleError line naming the file. Bundles written before checksums were recorded load as
before, their files unverified.

Torch-free (the serve path uses it): writing and loading the network's weights is
`imgrec.network`'s job. Every file is written atomically (atomic_write_bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .contract import Preprocess
from .errors import BundleError
from .files import being_written

FORMAT = "imgrec-bundle"
FORMAT_VERSION = 1
META_FILE = "imgrec.json"
#: a new imgrec.json written before the new weights take their place (`commit_weights`):
#: when a run is killed between the two renames, readers take it as the description
PENDING_META = ".imgrec.json.new"
WEIGHTS_FILE = "model.safetensors"
#: the SHA-256 of each training image's bytes, one a line: `evaluate` says when the images it
#: scores include them (a copy of the training folder is not held-out data)
TRAINING_DIGESTS = "training-images.sha256"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
#: imgrec.json key: {file name: {"bytes": size, "sha256": hex digest}} of the model files
FILES_KEY = "files"
#: imgrec.json key recording what `imgrec export` wrote and which file serving runs.
EXPORT_KEY = "export"


@dataclass
class Bundle:
    """A bundle's metadata, and where it lives."""

    path: Path
    architecture: dict[str, Any]
    classes: list[str]
    preprocess: Preprocess
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.extra.get("display_name") or self.path.name

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.extra.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
            "architecture": self.architecture,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "temperature": self.temperature,
            "training": self.training,
            "metrics": self.metrics,
            **{k: v for k, v in self.extra.items() if k != "created"},
        }

    def model_files(self) -> list[str]:
        """The names of the files holding the network: weights, ONNX exports (those that
        imgrec.json's export record names, too)."""
        names = [WEIGHTS_FILE, ONNX_FILE, ONNX_INT8_FILE]
        export = self.extra.get(EXPORT_KEY)
        if isinstance(export, dict):
            names += [v for k, v in export.items()
                      if k in _EXPORT_FILE_KEYS and isinstance(v, str) and _plain(v)]
        return list(dict.fromkeys(names))

    def derived_current(self, name: str) -> bool:
        """Whether the file `name`, made from model.onnx (model.int8.onnx), is there and was
        made from the model.onnx the bundle has now: imgrec.json's export record names it, and
        the digest of model.onnx recorded when it was made matches (copies, unzipping and
        checkouts keep that, not modification times); bundles that predate that digest: no
        older than model.onnx."""
        path = self.path / name
        if not path.is_file():
            return False
        export = self.extra.get(EXPORT_KEY)
        records = self.extra.get(FILES_KEY)
        if isinstance(export, dict) and name not in export.values():
            return False  # left over: imgrec.json does not know it
        source = export.get("int8_source_sha256") if isinstance(export, dict) else None
        record = records.get(ONNX_FILE) if isinstance(records, dict) else None
        if isinstance(source, str) and isinstance(record, dict) and record.get("sha256"):
            return source == record["sha256"]
        fp32 = self.onnx_path
        return not fp32.is_file() or path.stat().st_mtime >= fp32.stat().st_mtime

    def write_meta(self, staged: dict[str, Path] | None = None, to: str = META_FILE) -> None:
        """Write imgrec.json (or `to`) atomically (a crash never leaves half a file),
        recording the size and SHA-256 of each model file there, or of the file `staged`
        names for it (weights about to take their place)."""
        files = {}
        for name in self.model_files():
            source = (staged or {}).get(name, self.path / name)
            if source.is_file():
                size, digest = file_digest(source)
                files[name] = {"bytes": size, "sha256": digest}
        self.extra[FILES_KEY] = files
        atomic_write_text(self.path / to, json.dumps(self.to_json(), indent=2) + "\n")

    def commit_weights(self, data: bytes) -> None:
        """Replace the weights and imgrec.json together: both are written beside the old ones
        first, then renamed into place, weights first. A run killed before the first rename
        leaves the old bundle whole; one killed between the two leaves PENDING_META, which
        describes the new weights and which `read_bundle` then reads."""
        staged = self.path / f".{WEIGHTS_FILE}.new"
        atomic_write_bytes(staged, data)
        self.write_meta(staged={WEIGHTS_FILE: staged}, to=PENDING_META)
        os.replace(staged, self.weights_path)
        os.replace(self.path / PENDING_META, self.path / META_FILE)
        _fsync_folder(self.path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash or a power cut leaves the old file or the new
    one, never a part: a temporary file beside it, flushed and fsynced, renamed over it, and
    the folder fsynced (where the system supports it) so the rename itself is durable."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o644  # mkstemp's 0600 would hide the file from a server run as another user
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only folder, a file where a folder should be: one line
        from .errors import ImgrecError

        raise ImgrecError(f"cannot write {path} ({e.strerror or e})",
                          "choose a folder you can write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse
        pass
    finally:
        os.close(fd)


_DIGESTS: dict[tuple, tuple[int, str]] = {}


def file_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, remembered while its size, mtime and inode stay."""
    st = path.stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = (st.st_size, hashlib.file_digest(f, "sha256").hexdigest())
    return _DIGESTS[key]


def read_bundle(path: str | Path, need_weights: bool = True, exports: bool = True) -> Bundle:
    """Read and validate a bundle's metadata. Torch-free. `exports` False: model.onnx and
    model.int8.onnx are not checked (`imgrec export` rebuilds them from the weights, damaged
    or not)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle", "give a folder written by `imgrec train`")
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a folder, this is a file")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(
            f"{path}: not an imgrec bundle ({META_FILE} is missing)",
            "give a folder written by `imgrec train`",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{meta_path}: unreadable ({e})",
                          "retrain or restore the bundle") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not an imgrec bundle description")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is newer than this imgrec reads "
            f"({FORMAT_VERSION})",
            "upgrade imgrec (pip install -U imgrec)",
        )
    has_weights = (path / WEIGHTS_FILE).is_file()
    has_onnx = (path / ONNX_FILE).is_file()
    if need_weights and not has_weights:
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing", "retrain or restore the bundle")
    if not (has_weights or has_onnx or (path / ONNX_INT8_FILE).is_file()):  # int8 alone:
        raise BundleError(f"{path}: neither {WEIGHTS_FILE} nor {ONNX_FILE} is there")  # --int8
    bundle = _described(path, meta, meta_path)
    try:
        verify_bundle(bundle, () if exports else EXPORT_FILES)
    except BundleError:
        pending = _pending(path, exports)  # killed between the two renames of a commit
        if pending is None:
            busy = being_written(path)  # a training replacing it as we read: not damage
            if busy is not None:
                raise BundleError(busy.message, busy.hint) from None
            raise
        bundle = pending
    return bundle


def _pending(path: Path, exports: bool) -> Bundle | None:
    """The bundle PENDING_META describes, when it matches the files there."""
    meta_path = path / PENDING_META
    try:
        bundle = _described(path, json.loads(meta_path.read_text()), meta_path)
        verify_bundle(bundle, () if exports else EXPORT_FILES)
    except (OSError, ValueError, BundleError):
        return None
    return bundle


def _described(path: Path, meta: dict, meta_path: Path) -> Bundle:
    """The Bundle imgrec.json describes, every value checked (one line naming the file)."""
    try:
        classes = [str(c) for c in meta["classes"]]
        bundle = Bundle(
            path=path,
            architecture=dict(meta["architecture"]),
            classes=classes,
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            training=meta.get("training") or {},
            metrics=meta.get("metrics") or {},
            temperature=float(meta.get("temperature") or 1.0),
            extra={
                k: v
                for k, v in meta.items()
                if k
                not in {"format", "format_version", "architecture", "classes", "preprocess",
                        "training", "metrics", "temperature"}
            },
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{meta_path}: incomplete bundle description ({e})") from None
    except BundleError as e:  # a value out of range (preprocess)
        raise BundleError(f"{meta_path}: {e.message}", "restore the bundle, or retrain it") \
            from None
    if not (math.isfinite(bundle.temperature) and bundle.temperature > 0):
        raise BundleError(f"{meta_path}: temperature must be a positive number, not "
                          f"{bundle.temperature}", "restore the bundle, or recalibrate it")
    if not classes:
        raise BundleError(f"{meta_path}: the bundle lists no classes")
    return bundle


# -- checks ---------------------------------------------------------------------------------
_EXPORT_FILE_KEYS = ("onnx", "int8", "serve")
_DAMAGED = "the bundle is damaged or was changed by hand: restore it, or retrain/re-export it"


def _plain(name: str) -> bool:
    """A file name inside the bundle: no folder, no parent, not absolute (on any system)."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and ":" not in name and Path(name).name == name)


#: the files `imgrec export` makes from the weights
EXPORT_FILES = (ONNX_FILE, ONNX_INT8_FILE)


def verify_bundle(bundle: Bundle, skip: tuple[str, ...] = ()) -> None:
    """The checks `read_bundle` makes (see the module docstring), except on the files named
    in `skip`; torch-free."""
    meta_path = bundle.path / META_FILE
    export = bundle.extra.get(EXPORT_KEY) or {}
    records = bundle.extra.get(FILES_KEY) or {}
    if not isinstance(export, dict) or not isinstance(records, dict):
        raise BundleError(f"{meta_path}: its {EXPORT_KEY!r} or {FILES_KEY!r} is not a table",
                          _DAMAGED)
    named = [(f"{EXPORT_KEY}.{k}", v) for k, v in export.items() if k in _EXPORT_FILE_KEYS]
    for where, name in named + [(FILES_KEY, n) for n in records]:
        if not isinstance(name, str) or not _plain(name):
            raise BundleError(f"{meta_path}: {where} names {name!r}, a path outside the bundle",
                              _DAMAGED)
    for name, record in records.items():
        if name not in skip:
            verify_file(bundle.path / name, record)
    n = len(bundle.classes)
    declared = (bundle.architecture.get("args") or {}).get("num_classes")
    if isinstance(declared, int) and declared != n:
        raise BundleError(f"{meta_path}: the network has {declared} outputs (num_classes) but "
                          f"the bundle lists {n} classes", _DAMAGED)
    for name in bundle.model_files():
        path = bundle.path / name
        if name.endswith(".onnx") and path.is_file() and name not in skip:
            outputs = onnx_output_size(path)
            if outputs is not None and outputs != n:
                raise BundleError(f"{path}: the network has {outputs} outputs but the bundle "
                                  f"lists {n} classes", _DAMAGED)


def verify_file(path: Path, record: Any) -> None:
    """A recorded model file, if it is there, has the recorded size and SHA-256."""
    if not isinstance(record, dict) or not path.is_file():
        return
    size, want = record.get("bytes"), record.get("sha256")
    if isinstance(size, int) and path.stat().st_size != size:
        raise BundleError(f"{path}: {path.stat().st_size:,} bytes where imgrec.json recorded "
                          f"{size:,} (truncated or replaced)", _DAMAGED)
    if isinstance(want, str) and file_digest(path)[1] != want:
        raise BundleError(f"{path}: its SHA-256 is not the one imgrec.json recorded (the file "
                          "was altered or damaged)", _DAMAGED)


# -- the output size of an ONNX network, read from its protobuf without onnx or onnxruntime --
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def _first(buf: memoryview, span: tuple[int, int], number: int) -> tuple[int, int] | None:
    return next((v for n, w, v in _fields(buf, *span) if n == number and w == 2), None)


_ONNX_SIZES: dict[tuple, int | None] = {}


def onnx_output_size(path: Path) -> int | None:
    """The last dimension of an ONNX model's first output (its number of classes), or None
    when the file does not say (a symbolic dimension, a file that is no ONNX protobuf: ONNX
    Runtime will say what is wrong with it)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _ONNX_SIZES:
        _ONNX_SIZES[key] = _read_onnx_output_size(memoryview(path.read_bytes()))
    return _ONNX_SIZES[key]


def _read_onnx_output_size(buf: memoryview) -> int | None:
    try:
        graph = _first(buf, (0, len(buf)), 7)  # ModelProto.graph
        output = graph and _first(buf, graph, 12)  # GraphProto.output[0]
        kind = output and _first(buf, output, 2)  # ValueInfoProto.type
        tensor = kind and _first(buf, kind, 1)  # TypeProto.tensor_type
        shape = tensor and _first(buf, tensor, 2)  # Tensor.shape
        dims = [d for n, w, d in _fields(buf, *shape) if n == 1 and w == 2] if shape else []
        if not dims:
            return None
        last = [(n, v) for n, w, v in _fields(buf, *dims[-1]) if n == 1 and w == 0]
        return last[0][1] if last else None
    except (ValueError, IndexError):
        return None



def write_training_digests(folder: Path, paths: list[str]) -> None:
    """TRAINING_DIGESTS for these image files (the unreadable ones left out)."""
    from .feature_cache import digest_all

    digests = sorted({d for d in digest_all(paths) if isinstance(d, str)})
    atomic_write_text(Path(folder) / TRAINING_DIGESTS, "".join(f"{d}\n" for d in digests))


def training_overlap(bundle: Bundle, digests: list) -> int | None:
    """How many of these content digests (`feature_cache.digest_all`'s) are a training
    image's (None: the bundle records none)."""
    try:
        known = set((Path(bundle.path) / TRAINING_DIGESTS).read_text().split())
    except OSError:
        return None
    return sum(1 for d in digests if isinstance(d, str) and d in known)


def serving_onnx_path(bundle: Bundle) -> Path:
    """The ONNX file that serving runs: the one `imgrec export` recorded in imgrec.json
    ("export": {"serve": FILE}) when it is there and was made from this model.onnx (a
    re-export or retraining makes an old int8 file stale: `Bundle.derived_current`), else
    model.onnx. Torch-free."""
    fp32 = Path(bundle.onnx_path)
    name = (bundle.extra.get(EXPORT_KEY) or {}).get("serve")
    if isinstance(name, str) and _plain(name) and name != fp32.name \
            and bundle.derived_current(name):
        return Path(bundle.path) / name
    return fp32
