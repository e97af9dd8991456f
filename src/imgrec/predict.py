"""Prediction: a Predictor turns images into top-k labels with probabilities.

It reads only the bundle. Engines: ONNX Runtime when the bundle has model.onnx (fast on the
CPU, and torch-free, which the serve path needs), else PyTorch.
"""

from __future__ import annotations

import numbers
import os
import queue
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ONNX_INT8_FILE, Bundle
from .contract import load_input
from .errors import ImgrecError, InputError, UnreadableImage
from .images import hidden, is_image_path
from .zoo import open_bundle

URL_TIMEOUT_S = 15.0
URL_MAX_BYTES = 20 * 1024 * 1024


@dataclass
class Prediction:
    """One label of an image's top k. `index` is the class's position in the bundle's
    classes (sorted, for labels given as numbers), not the label's own value: labels 1..10
    predict label "10" as index 9. `label` is the class's name."""

    label: str
    index: int
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxEngine:
    """Runs model.onnx in ONNX Runtime: several times faster than eager PyTorch on a CPU.
    Its `name` is "int8" when the file is model.int8.onnx, so every record of a run says so."""

    def __init__(self, bundle: Bundle | None = None, threads: int | None = None,
                 path: Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        # No busy-waiting between ops: decoding threads, the event loop and other processes
        # get the cores (measured faster on 2 cores, for serving and feature extraction).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # serve may pick model.int8.onnx; feature extraction passes its backbone's file
        self.path = Path(path or bundle.onnx_path)
        self.name = "int8" if self.path.name == ONNX_INT8_FILE else "onnx"
        self.session = ort.InferenceSession(str(self.path), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(np.float32, copy=False)})[0]


def int8_onnx_path(bundle: Bundle, model: str | Path | None = None) -> Path:
    """The bundle's model.int8.onnx, refused in one line when it is missing or older than
    model.onnx (a re-export or retraining made it stale). `model`: the name the user gave,
    for the hint."""
    path = Path(bundle.path) / ONNX_INT8_FILE
    hint = f"run `imgrec export {model or bundle.path} --int8` first"
    if not path.is_file():
        raise InputError(f"{bundle.path}: no {ONNX_INT8_FILE} (int8 model)", hint)
    if not bundle.derived_current(ONNX_INT8_FILE):
        raise InputError(f"{bundle.path}: {ONNX_INT8_FILE} was made from an earlier "
                         "model.onnx (stale)", hint)
    return path


def make_engine(bundle: Bundle, engine: Any = "auto", device: Any = None,
                threads: int | None = None):
    """`engine`: auto (ONNX Runtime when model.onnx is there and the device is the CPU, else
    PyTorch), onnx, int8 (model.int8.onnx) or torch; or an engine object already built."""
    if not isinstance(engine, str):  # an engine object already built (serve picks the file)
        return engine
    if engine == "int8":
        return OnnxEngine(bundle, threads, int8_onnx_path(bundle))
    if engine == "onnx" or (engine == "auto" and bundle.onnx_path.is_file()
                            and (device in (None, "cpu"))):
        if not bundle.onnx_path.is_file():
            raise InputError(f"{bundle.path}: no model.onnx", "run `imgrec export MODEL` first")
        return OnnxEngine(bundle, threads)
    if engine not in ("auto", "torch"):
        raise InputError(f"unknown engine {engine!r}", "use auto, onnx, int8 or torch")
    from .network import TorchEngine  # the only way from predict to torch (docs/architecture.md)

    return TorchEngine(bundle, device, threads=threads)


class Predictor:
    """Load once, predict many: `Predictor.load("runs/mnist").predict(["7.png", "8.png"])`."""

    def __init__(self, bundle: Bundle, engine: str = "auto", device: Any = None,
                 threads: int | None = None):
        self.bundle = bundle
        self.contract = bundle.preprocess
        self.classes = bundle.classes
        self.engine = make_engine(bundle, engine, device, threads)

    @classmethod
    def load(cls, model: str | Path | None = None, engine: str = "auto", device: Any = None,
             threads: int | None = None) -> Predictor:
        bundle = open_bundle(model, need_weights=engine == "torch")
        if engine == "int8":  # checked here, so the hint names the model as the user gave it
            int8_onnx_path(bundle, model or "imagenet")
        return cls(bundle, engine, device, threads)

    # -- core ------------------------------------------------------------------------------
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x C x H x W (already through the contract) -> logits N x classes."""
        return self.contract.tta_logits(self.engine, self.contract.normalize(pixels))

    def probabilities(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [softmax(self.logits(pixels[i : i + batch_size]), self.bundle.temperature)
               for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[Prediction]]:
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[Prediction(self.classes[j], int(j), float(p[j])) for j in row]
                for row, p in zip(order, probs, strict=True)]

    def prepare(self, source: str | Path | bytes, invert: str | None = None) -> np.ndarray:
        """Decode + contract for one input (file path, URL or bytes)."""
        if is_url(source):
            return load_input(fetch_url(source), self.contract, invert, name=source)
        if _unread_file(source):  # Image.open(path), not decoded yet: as the file itself
            return load_input(source.filename, self.contract, invert)
        if not isinstance(source, str | bytes) and (  # (np.str_ has __array__: a path)
                hasattr(source, "__array__") or hasattr(source, "getpixel")):  # in memory
            return load_input(_as_png(source), self.contract, invert, name="array")
        if isinstance(source, bytearray | memoryview):
            source = bytes(source)
        if not isinstance(source, str | Path | bytes):
            raise InputError(f"cannot read an image from {type(source).__name__} "
                             f"{source!r:.60}", "give a path, bytes, a PIL image or an array")
        return load_input(source, self.contract, invert)

    def predict(self, sources: list, top_k: int = 5, invert: str | None = None,
                batch_size: int = 32) -> list[list[Prediction] | UnreadableImage]:
        """Predictions for each source (a path, URL, bytes, PIL image or H x W (x C) uint8
        array; one source alone is a list of one), or the UnreadableImage/InputError
        explaining why not."""
        sources = _as_sources(sources)
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
            raise InputError(f"top_k must be a whole number of at least 1, not {top_k!r}")
        top_k = int(top_k)
        if invert not in INVERT_CHOICES:  # True, "Yes": the bundle's default, silently
            raise InputError(f"invert must be one of {', '.join(map(str, INVERT_CHOICES[1:]))} "
                             f"or None (the bundle's), not {invert!r}")
        results: list[Any] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            prepared = decode_many(lambda s: self.prepare(s, invert), chunk)
            good = [(i, p) for i, p in enumerate(prepared) if isinstance(p, np.ndarray)]
            for i, p in enumerate(prepared):
                if not isinstance(p, np.ndarray):
                    results[start + i] = p
            if good:
                probs = self.probabilities(np.stack([p for _, p in good]))
                for (i, _), preds in zip(good, self.top_k(probs, top_k), strict=True):
                    results[start + i] = preds
        return results


#: predict's `invert`: None keeps the bundle's own setting
INVERT_CHOICES = (None, "auto", "yes", "no")


def _as_sources(sources: Any) -> list:
    """predict's inputs as a list of images: one path, bytes, PIL image or H x W (x C) array
    is a list of one; an N x H x W x C or N x C x H x W array, and a 3-D one without a
    channel axis last (N x H x W, greyscale), is N images, as `imgrec.train` reads them (one
    C x H x W image goes in a list); any other iterable (a generator) is listed."""
    if isinstance(sources, str | Path | bytes | bytearray | memoryview) or \
            hasattr(sources, "getpixel"):
        return [sources]  # "cat.jpg" is one image, not seven one-letter paths
    if hasattr(sources, "__array__") and not isinstance(sources, list | tuple):
        array = np.asarray(sources)
        if array.dtype.kind in "USO":
            return array.tolist()  # an array of paths
        if array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
            return list(array)  # as train reads a 3-D array: N greyscale images
        return [array]
    if isinstance(sources, list):
        return sources
    try:
        return list(sources)
    except TypeError:
        raise InputError(f"cannot predict {type(sources).__name__} {sources!r:.60}",
                         "give a path, bytes, a PIL image or an array, or a list of them") \
            from None


def _channels_axis(shape: tuple) -> int | None:
    """Where a 3-D image array keeps its channels: -1 (H x W x C), 0 (C x H x W), or None
    (neither: N greyscale images)."""
    if shape[-1] in (1, 3, 4):
        return -1
    if shape[0] in (1, 3):
        return 0
    return None


def _array_image(source: Any) -> np.ndarray:
    """An in-memory image (array, tensor) as H x W (x C) uint8: C x H x W is turned, and
    floats are scaled by the rule `imgrec.train` reads arrays with (0..1 or 0..255)."""
    from .data.arrays import as_uint8

    image = np.asarray(source)
    if image.ndim == 3 and _channels_axis(image.shape) == 0:
        image = image.transpose(1, 2, 0)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"an array image must be H x W, H x W x C (C 1, 3 or 4) or C x H x W "
                         f"(C 1 or 3), not shape {image.shape}")
    try:
        return as_uint8(image)
    except ImgrecError as e:  # a predict input: the item's own error, not the batch's
        raise InputError(e.message, e.hint) from None


#: PIL modes PNG keeps as they are; the others (CMYK, LAB, YCbCr, F, I, RGBX ...) go as TIFF
PNG_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16"}


def _unread_file(image) -> bool:
    """A PIL image opened from a file and not decoded yet (its `tile` still lists the work):
    predicted from that file, it decodes as the file does, a large JPEG at reduced scale
    (a decoded image is resized from full size: a big photo's probabilities differed ~1e-2)."""
    filename = getattr(image, "filename", None)
    return bool(getattr(image, "tile", None) and isinstance(filename, str) and filename
                and hasattr(image, "getpixel") and os.path.isfile(filename))


def _as_png(image) -> bytes:
    """A PIL image or an H x W (x C) uint8 array as PNG (or, for modes PNG cannot hold, TIFF)
    bytes, so it takes the one decoding and preprocessing path every file takes; an image
    opened from a file is turned upright by its EXIF orientation first, as its file is."""
    import io

    from PIL import Image, ImageOps

    if not hasattr(image, "getpixel"):
        image = _array_image(image)
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1
                                else image)
    image = ImageOps.exif_transpose(image)
    buf = io.BytesIO()
    if image.mode in PNG_MODES:
        image.save(buf, format="PNG", compress_level=0)
        return buf.getvalue()
    try:
        image.save(buf, format="TIFF")
    except (OSError, KeyError, ValueError):  # a mode no format writes (HSV): as RGB
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="TIFF")
    return buf.getvalue()


def decode_many(fn, sources: list) -> list:
    """Run fn over sources in threads (Pillow releases the GIL while decoding); an
    InputError becomes the item's result instead of stopping the batch."""

    def safe(s):
        try:
            return fn(s)
        except InputError as e:
            return e

    if len(sources) <= 1:
        return [safe(s) for s in sources]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(safe, sources))


#: the most inference lanes started by default (each holds a copy of the model)
MAX_LANES = 4


def available_cores() -> int:
    """The cores this process may use (a container's CPU set, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def lane_count(cores: int | None = None) -> int:
    """How many inference lanes (single-threaded ONNX Runtime sessions, each decoding and
    running its own batches) for the cores this process may use: one per core, at most
    MAX_LANES. serve sizes its lanes the same way (ServeConfig.engine_lanes)."""
    return max(1, min(MAX_LANES, cores or available_cores()))


def in_lanes(lanes: list, work: Callable[[Any, list], Any], chunks: Iterable[list],
             ahead: int | None = None) -> Iterator:
    """work(lane, chunk) for every chunk, each lane taking the next chunk when it is free;
    results in chunk order. With one single-threaded engine per core, one lane decodes (Pillow
    releases the GIL) while another runs ONNX Runtime: on 2 cores this beat one 2-thread
    session fed by a decoding thread (the README's transfer row), as serve's lanes did.
    `chunks` is read lazily and at most `ahead` (default 2 per lane) are in flight, so a
    stream of millions of files (`imgrec predict --out`) holds a few batches, not all."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for lane in lanes:
        free.put(lane)

    def run(chunk: list):
        lane = free.get()
        try:
            return work(lane, chunk)
        finally:
            free.put(lane)

    ahead = max(1, ahead or 2 * len(lanes))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=max(1, len(lanes))) as pool:
        for chunk in chunks:
            pending.append(pool.submit(run, chunk))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def lane_predictors(predictor: Predictor) -> list[Predictor]:
    """One predictor per lane: single-threaded sessions of the same ONNX file, one per core
    (lane_count), or the predictor itself (PyTorch, or one core)."""
    engine = predictor.engine
    if not isinstance(engine, OnnxEngine) or lane_count() == 1:
        return [predictor]
    return [Predictor(predictor.bundle, engine=OnnxEngine(threads=1, path=engine.path))
            for _ in range(lane_count())]


def as_record(source: str, result: Any) -> dict[str, Any]:
    """One input's entry in `imgrec predict --json` (and in each row of `--out`):
    {"input", "predictions": [{"label", "index", "probability"}, ...]} or {"input", "error"}."""
    if isinstance(result, Exception):
        return {"input": source, "error": str(result)}
    return {"input": source, "predictions": [p.to_dict() for p in result]}


def is_url(source: object) -> bool:
    """An http(s) address (the scheme in any case: HTTP://host/cat.jpg is one too)."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def quoted_url(url: str) -> str:
    """`url` as urllib can send it: spaces and non-ASCII characters in its path and query
    percent-encoded (as a browser does with an address copied from its bar); what is
    encoded already stays as it is."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    host = parts.netloc.encode("idna").decode("ascii") if not parts.netloc.isascii() else \
        parts.netloc
    safe = "/%:@!$&'()*+,;=~-._"
    return urlunsplit((parts.scheme.lower(), host, quote(parts.path, safe=safe),
                       quote(parts.query, safe=safe + "?"), quote(parts.fragment, safe=safe)))


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """Download an image within `timeout` seconds in all (a server that trickles bytes is
    cut off, not waited on for ever: urlopen's timeout bounds each read only) and a size cap."""
    deadline = time.monotonic() + timeout
    try:
        req = urllib.request.Request(quoted_url(url), headers={"User-Agent": "imgrec"})
    except (ValueError, UnicodeError) as e:
        raise InputError(f"{url}: not a valid address ({e})") from None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            if length and int(length) > max_bytes:
                raise InputError(f"{url}: {int(length):,} bytes is over the {max_bytes:,} cap")
            chunks, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise InputError(f"{url}: the download took over {timeout:g} s",
                                     "check the address, or download the file first")
                chunk = r.read1(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    except InputError:
        raise
    except Exception as e:
        why = " ".join(str(e).split())  # urllib's redirect-loop message spans lines
        raise InputError(f"{url}: cannot fetch ({why})",
                         "check the address and the network") from None
    if len(data) > max_bytes:
        raise InputError(f"{url}: larger than the {max_bytes:,}-byte cap")
    return data


def expand_inputs(inputs: Iterable[str]) -> Iterator[str]:
    """Files as given, folders recursively (image files only, sorted), URLs as given. Lazy:
    a folder is listed one directory at a time (`walk_images`), never as one list."""
    for item in inputs:
        if is_url(item):
            yield item
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = False
            for file in walk_images(path):
                found = True
                yield str(file)
            if not found:
                raise InputError(f"{item}: the folder holds no image files")
        else:
            yield item


def walk_images(folder: Path, _chain: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Image files under `folder` in sorted path order (what sorted(folder.rglob("*")) gives:
    each directory's names sorted, depth first), holding one directory's names at a time.
    A symlinked folder is followed, as train and doctor follow a symlinked class folder,
    unless it leads back to a folder being walked or one above it (a loop, `..`, `/`);
    unreadable subfolders are skipped and hidden names (.git/, ._photo.jpg, __MACOSX/) left
    out, as every listing does."""
    chain = _chain | {os.path.realpath(folder)}
    names, dirs = [], set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if hidden(entry.name):
                    continue
                names.append(entry.name)
                if entry.is_dir() and not _leads_back(os.path.realpath(entry.path), chain):
                    dirs.add(entry.name)
    except OSError:
        return
    for name in sorted(names):
        path = folder / name
        if name in dirs:
            yield from walk_images(path, chain)
        elif is_image_path(path) and path.is_file():
            yield path


def _leads_back(target: str, chain: frozenset[str]) -> bool:
    """A folder that is one being walked or holds one (a link to `..` or `/`): following it
    would walk the folders above the one asked for, or loop."""
    return any(c == target or c.startswith(target.rstrip(os.sep) + os.sep) for c in chain)


def sample_photos() -> list[str]:
    """The photos bundled with imgrec (used when predict is given no input)."""
    folder = Path(__file__).parent / "samples"
    return [str(p) for p in sorted(folder.glob("*.jpg"))]
