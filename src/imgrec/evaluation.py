"""Honest evaluation of a bundle on a split it did not train on: accuracy, top-5, per-class
precision/recall/F1/support, the confusion matrix (table and PNG) and the most confident
mistakes. Reads only the bundle."""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    TRAINING_DIGESTS,
    Bundle,
    atomic_write_text,
    file_digest,
    training_overlap,
)
from .contract import Preprocess, fit_arrays, load_input
from .data.datasets import Dataset, load_dataset, sign_letter
from .errors import DataError, InputError
from .feature_cache import FeatureCache, cache_root, digest_all, extractor_key
from .figures import drawing, save_figure
from .predict import OnnxEngine, Predictor, in_lanes, lane_count, softmax
from .zoo import open_bundle

#: Font size (points) of the confusion matrix's title.
TITLE_SIZE = 12


def _suptitle(fig: Any, text: str, fontsize: float) -> None:
    """`text` as the figure's title, broken into lines where (and only where) it is wider than
    the figure, as measured by the renderer."""
    title = fig.suptitle(text, fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    room = 0.96 * fig.bbox.width
    per_line = len(text)
    while per_line > 10 and (width := title.get_window_extent(renderer).width) > room:
        per_line = min(per_line - 1, int(per_line * room / width))
        title.set_text("\n".join(textwrap.wrap(text, per_line, break_on_hyphens=False)))


@dataclass
class EvalReport:
    labels: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    inputs: list[str]
    split: str
    dataset: str
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None  #: scoring time (decoding included; not loading the bundle)
    engine: str | None = None
    from_feature_cache: int = 0  #: images scored from features training had already cached
    #: images whose bytes are a training image's (None: not known: arrays, an older bundle)
    training_overlap: int | None = None
    #: the report's calibration: its expected calibration error and the temperature applied
    calibration: dict[str, float] | None = None

    def __repr__(self) -> str:  # the dataclass's dumped every probability (1 MB for MNIST)
        return (f"EvalReport({self.dataset} {self.split}: {self.n} images, accuracy "
                f"{self.accuracy:.4f}, {len(self.labels)} classes, engine {self.engine}"
                f"{f', {len(self.skipped)} skipped' if self.skipped else ''})")

    @property
    def n(self) -> int:
        return len(self.y_true)

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.y_pred == self.y_true).mean()) if self.n else 0.0

    @property
    def top5_accuracy(self) -> float | None:
        if len(self.labels) <= 5 or not self.n:
            return None
        top5 = np.argsort(-self.probs, axis=1)[:, :5]
        return float((top5 == self.y_true[:, None]).any(1).mean())

    def confusion(self) -> np.ndarray:
        from sklearn.metrics import confusion_matrix

        return confusion_matrix(self.y_true, self.y_pred, labels=range(len(self.labels)))

    def per_class(self) -> dict[str, dict[str, float]]:
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, s = precision_recall_fscore_support(
            self.y_true, self.y_pred, labels=range(len(self.labels)), zero_division=0)
        return {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                      "support": int(s[i])} for i, lab in enumerate(self.labels)}

    def mistakes(self, k: int = 10) -> list[dict[str, Any]]:
        """The k wrong predictions made with the highest confidence."""
        wrong = np.flatnonzero(self.y_pred != self.y_true)
        conf = self.probs[wrong, self.y_pred[wrong]]
        out = []
        for i in wrong[np.argsort(-conf)][:k]:
            out.append({"input": self.inputs[i], "true": self.labels[self.y_true[i]],
                        "predicted": self.labels[self.y_pred[i]],
                        "probability": float(self.probs[i, self.y_pred[i]])})
        return out

    def headline(self) -> dict[str, Any]:
        """The figures a bundle records after training (no scikit-learn import: cheap)."""
        return {"accuracy": self.accuracy, "top5_accuracy": self.top5_accuracy, "n": self.n,
                "split": self.split, "dataset": self.dataset}

    def summary(self, mistakes: int = 10) -> dict[str, Any]:
        """The DESIGN.md JSON schema, with the `mistakes` most confident mistakes."""
        return {"accuracy": self.accuracy, "top5_accuracy": self.top5_accuracy, "n": self.n,
                "labels": self.labels, "confusion_matrix": self.confusion().tolist(),
                "per_class": self.per_class(), "split": self.split, "dataset": self.dataset,
                "mistakes": self.mistakes(mistakes), "skipped": self.skipped,
                "seconds": self.seconds, "engine": self.engine,
                "images_per_s": round(self.n / self.seconds, 1) if self.seconds else None,
                "from_feature_cache": self.from_feature_cache,
                "training_overlap": self.training_overlap,
                **({"calibration": self.calibration} if self.calibration else {})}

    def table(self) -> str:
        """Per-class metrics and the confusion matrix as plain text."""
        width = max(8, *(len(lab) for lab in self.labels)) + 1
        lines = [f"{'class':<{width}} precision  recall     f1  support"]
        for lab, m in self.per_class().items():
            lines.append(f"{lab:<{width}} {m['precision']:9.4f} {m['recall']:7.4f} "
                         f"{m['f1']:6.4f} {m['support']:8d}")
        cm = self.confusion()
        cell = max(5, len(str(cm.max())) + 1)
        short = [lab[: cell - 1] for lab in self.labels]
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * width + "".join(f"{s:>{cell}}" for s in short)]
        for lab, row in zip(self.labels, cm, strict=True):
            lines.append(f"{lab:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
        return "\n".join(lines)

    def plot_confusion(self, path: Path) -> Path:
        """The confusion matrix as a PNG. The title sits over the whole figure, wrapped to its
        width, and the layout makes room for it and for long class names: nothing is clipped
        (a long title over the matrix used to run off the figure's left edge)."""
        plt = drawing()

        cm = self.confusion()
        n = len(self.labels)
        side = min(20, max(5, 0.6 * n + 2))
        room = min(4.0, 0.075 * max(len(lab) for lab in self.labels))  # tick labels, inches
        fig, ax = plt.subplots(figsize=(side + room, side * 0.85 + 0.7 * room),
                               layout="constrained")
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
        ax.set_xticks(range(n), self.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), self.labels)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        title = (f"Confusion matrix: {self.dataset} {self.split} "
                 f"(accuracy {self.accuracy:.2%}, n={self.n})")
        _suptitle(fig, title, TITLE_SIZE)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
        save_figure(fig, path, dpi=100, tight=False)  # constrained layout, not tight_layout
        return path

    def write_json(self, path: Path, mistakes: int = 10) -> None:
        atomic_write_text(Path(path), json.dumps(self.summary(mistakes), indent=2) + "\n")


def selection_note(rep: EvalReport, asked: str, bundle: Bundle) -> str | None:
    """What to say when the test split was asked for and the data had none, so the
    validation split was scored: for the bundle that picked its best epoch on it, an
    optimistic figure."""
    t = bundle.training
    if asked != "test" or rep.split != "val" or not t.get("best_epoch") or \
            rep.dataset != t.get("dataset"):  # another dataset's validation split: held out
        return None
    return ("no test split, so this scored the validation split, which chose this model's "
            "best epoch: an optimistic figure (hold out a test/ folder for an honest one)")


def overlap_note(rep: EvalReport) -> str:
    """What to say when the scored images include the model's own training images."""
    return (f"{rep.training_overlap} of these {rep.n} images are this model's own training "
            "images (the same bytes): this accuracy is not held-out")


def _label_map(bundle: Bundle, ds: Dataset) -> np.ndarray:
    """Dataset label index -> bundle class index, matched by name."""
    index = {c: i for i, c in enumerate(bundle.classes)}
    unknown = [c for c in ds.classes if c not in index]
    letters = [sign_letter(int(c)) for c in ds.classes if c.isdigit() and int(c) < 26]
    if unknown and ds.source.lower().endswith(".csv") and len(letters) == len(ds.classes) \
            and all(c in index for c in letters):
        # a pixel CSV's labels as the letters a Sign-Language-MNIST model was trained on
        # (training names them so when its file says "sign"; a held-out copy may not)
        return np.array([index[c] for c in letters], np.int64)
    if unknown:
        raise DataError(
            f"{ds.name} has classes the model does not know: {', '.join(unknown[:5])}",
            f"the model's classes are {', '.join(bundle.classes[:10])}",
        )
    return np.array([index[c] for c in ds.classes], np.int64)


def decode_evaluated(path: str | Path, contract: Preprocess) -> np.ndarray:
    """The uint8 C x H x W pixels evaluation scores for one image file: the contract as predict
    and serve apply it (its own invert and fit). The report's mistakes gallery shows these
    pixels and its Grad-CAM explains them, so both come from here."""
    return load_input(path, contract)


def _array_marker(ds: Dataset, split: str) -> str:
    """How images of an in-memory dataset are named in EvalReport.inputs: this, then the index."""
    return f"{ds.name}/{split}#"


def evaluated_pixels(item: str, ds: Dataset, split: str, contract: Preprocess) -> np.ndarray:
    """The pixels one evaluated input (an EvalReport.inputs entry: a file, or `name/split#i`
    of an in-memory dataset) was scored on."""
    marker = _array_marker(ds, split)
    images = ds.splits[split].images
    if item.startswith(marker) and images is not None:
        i = int(item[len(marker):])
        return fit_arrays(images[i : i + 1], contract)[0]
    return decode_evaluated(item, contract)


def evaluate_bundle(model: Bundle | str | Path, data: Dataset | str, split: str = "test",
                    device: Any = None, data_dir: str | None = None, engine: str = "auto",
                    batch_size: int = 256, seed: int | None = None) -> EvalReport:
    """The bundle's scores on a split of `data` (a name or path: see `evaluation_data`)."""
    bundle = open_bundle(model)
    if isinstance(data, str | Path):
        ds, split = evaluation_data(bundle, str(data), split, data_dir, seed)
    elif isinstance(data, Dataset):
        ds = data
    else:  # (x, y) arrays or a torch Dataset held in Python: every image is held out
        ds, split = held_data(data), "all"
    split_name, s = ds.split(split)
    mapping = _label_map(bundle, ds)
    predictor = Predictor(bundle, engine=engine, device=device, threads=lane_count())
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    from_cache = 0
    if s.images is not None:
        probs = predictor.probabilities(fit_arrays(s.images, bundle.preprocess), batch_size)
        keep = list(range(len(s)))
        inputs = [f"{_array_marker(ds, split_name)}{i}" for i in range(len(s))]
        overlap = None
    else:
        # each file's content digest, once: the feature cache's key and the training overlap's
        digests = digest_all(s.paths) if needs_digests(bundle) else None
        probs, keep, skipped, from_cache = _score_files(predictor, s.paths, digests)
        inputs = [s.paths[i] for i in keep]
        overlap = None if digests is None else training_overlap(bundle, [digests[i] for i in keep])
    if not keep:
        raise DataError(f"no readable image in {ds.name} {split_name}")
    y_true = mapping[s.labels[np.array(keep)]]
    seconds = time.perf_counter() - t0
    return EvalReport(list(bundle.classes), y_true, probs, inputs, split_name, ds.name, skipped,
                      seconds, getattr(predictor.engine, "name", None), from_cache, overlap)


def held_data(data: Any) -> Dataset:
    """`evaluate`'s data held in Python, read as `imgrec.train` reads it, all in one split."""
    from .data.arrays import dataset_from_arrays, dataset_from_torch

    if isinstance(data, tuple) and len(data) == 2:
        ds = dataset_from_arrays(*data, name="arrays", val_fraction=0.0, test_fraction=0.0)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and \
            not isinstance(data, list | dict):
        ds = dataset_from_torch(data, val_fraction=0.0, test_fraction=0.0)
    else:
        raise DataError(f"cannot evaluate on a {type(data).__name__}",
                        "give a dataset name, a folder, a CSV, arrays (x, y) or a torch Dataset")
    ds.splits = {"all": ds.splits["train"]}
    return ds


def evaluation_data(bundle: Bundle, data: str, split: str, data_dir: str | None = None,
                    seed: int | None = None) -> tuple[Dataset, str]:
    """(dataset, split) to evaluate: the data the bundle trained on is split again as it was
    (same seed, same fractions), so its test share is still unseen; any other folder or CSV
    without split folders is held-out data as a whole, and split "test" becomes "all"."""
    t = bundle.training
    whole = split == "test" and not is_training_data(bundle, data)
    ds = load_dataset(data, data_dir, val_fraction=0.0 if whole else t.get("val_fraction", 0.1),
                      test_fraction=0.0 if whole else t.get("test_fraction", 0.1),
                      seed=t.get("seed", 0) if seed is None else seed)
    if whole and set(ds.splits) == {"train"}:  # no split folders: every image is held out
        ds.splits = {"all": ds.splits["train"]}
        return ds, "all"
    return ds, split


def is_training_data(bundle: Bundle, data: str) -> bool:
    """Whether `data` names what the bundle trained on: the same folder or CSV (recorded as
    an absolute path, `data_path`), or for a built-in dataset the same name. While the
    recorded folder exists the path as it was given is not compared ("photos" named another
    folder from another working folder, and evaluate scored that folder's "test" split, or
    refused it, instead of all of it); once it is gone (the checkout moved) the name is."""
    t = bundle.training
    recorded = t.get("data_path")
    if isinstance(recorded, str) and recorded and Path(recorded).exists():
        try:
            here = Path(data).expanduser()
            return here.exists() and Path(recorded).resolve() == here.resolve()
        except OSError:
            return False
    # no recorded path, or it is gone (a moved checkout): the name as it was given
    name = t.get("data")  # a built-in dataset's name (or, in an older bundle, a path)
    if not isinstance(name, str) or not name:
        return False
    if name == data:
        return True
    try:
        here = Path(data).expanduser()
        return here.exists() and Path(name).expanduser().resolve() == here.resolve()
    except OSError:
        return False


#: images decoded per batch while the engine runs the batch before
FILE_BATCH = 32


def needs_digests(bundle: Bundle) -> bool:
    """Whether evaluating files uses their content digests: the bundle records its training
    images' (TRAINING_DIGESTS), or features training cached their embeddings."""
    return (Path(bundle.path) / TRAINING_DIGESTS).is_file() or \
        isinstance(bundle.training.get("feature_reuse"), dict)


def _score_files(predictor: Predictor, paths: list[str], digests: list | None = None
                 ) -> tuple[np.ndarray, list[int], dict[str, str], int]:
    """Probabilities of image files: those training already embedded from the feature cache
    (cached_logits), the others decoded and run in lanes (`predict.in_lanes`: one
    single-threaded ONNX Runtime session per core; PyTorch is one lane).
    (probabilities, indices scored, {path: reason} skipped, from the cache)"""
    bundle = predictor.bundle
    logits = cached_logits(predictor, paths, digests)
    scored = {i: softmax(row[None], bundle.temperature)[0] for i, row in logits.items()}
    todo = [i for i in range(len(paths)) if i not in scored]
    chunks = [todo[k : k + FILE_BATCH] for k in range(0, len(todo), FILE_BATCH)]

    def score(lane: Predictor, chunk: list[int]):
        decoded = []
        for i in chunk:
            try:
                decoded.append(decode_evaluated(paths[i], bundle.preprocess))
            except InputError as e:
                decoded.append(e)
        good = [(i, p) for i, p in zip(chunk, decoded, strict=True) if isinstance(p, np.ndarray)]
        bad = {paths[i]: p.message for i, p in zip(chunk, decoded, strict=True)
               if not isinstance(p, np.ndarray)}
        probs = (lane.probabilities(np.stack([p for _, p in good]), FILE_BATCH) if good else [])
        return [i for i, _ in good], probs, bad

    skipped: dict[str, str] = {}
    for indices, probs, bad in in_lanes(_lanes(predictor), score, chunks):
        scored.update(zip(indices, probs, strict=True))
        skipped.update(bad)
    keep = sorted(scored)
    probs = (np.stack([scored[i] for i in keep]) if keep
             else np.zeros((0, len(bundle.classes)), np.float32))
    return probs, keep, skipped, len(logits)


def _lanes(predictor: Predictor) -> list[Predictor]:
    """One predictor per lane: single-threaded sessions of the same ONNX file per core, or
    the predictor itself (PyTorch, or one core)."""
    engine = predictor.engine
    if not isinstance(engine, OnnxEngine) or lane_count() == 1:
        return [predictor]
    return [Predictor(predictor.bundle, engine=OnnxEngine(threads=1, path=engine.path))
            for _ in range(lane_count())]


def cached_logits(predictor: Predictor, paths: list[str],
                  digests: list | None = None) -> dict[int, np.ndarray]:
    """{index: logits} of the images a features-mode bundle's training already embedded: their
    cached features through the head part of the bundle's model.onnx. Only when that file is
    the one training composed (its SHA-256 recorded in imgrec.json's "feature_reuse") and run
    by ONNX Runtime, the contract has no test-time augmentation, and the cache's extractor
    key, recomputed from the bundle's backbone, weights identity and contract, is the one
    recorded: then these are the logits the whole file gives for the image, bit for bit up to
    float rounding. Otherwise (or without the onnx package) {}: every image is decoded."""
    bundle, reuse = predictor.bundle, predictor.bundle.training.get("feature_reuse")
    if (not isinstance(reuse, dict) or bundle.preprocess.tta
            or getattr(predictor.engine, "path", None) != bundle.onnx_path):
        return {}
    t = bundle.training
    key = extractor_key(str(t.get("backbone")), str(t.get("weights")), bundle.preprocess)
    if (key != reuse.get("extractor") or not (cache_root() / key).is_dir()
            or file_digest(bundle.onnx_path)[1] != reuse.get("onnx_sha256")):
        return {}
    try:
        head = _head_session(bundle.onnx_path, str(reuse.get("tensor")))
    except Exception:  # noqa: BLE001 (no onnx package, a file not shaped as composed: decode)
        return {}
    name, dim = head.get_inputs()[0].name, head.get_inputs()[0].shape[-1]
    cache = FeatureCache(key, int(dim))
    found = {i: vec for i, d in enumerate(digests if digests is not None else digest_all(paths))
             if isinstance(d, str) and (vec := cache.get(d)) is not None}
    if not found:
        return {}
    order = sorted(found)
    out = head.run(None, {name: np.stack([found[i] for i in order])})[0]
    return dict(zip(order, out, strict=True))


def _head_session(onnx_path: Path, tensor: str):
    """An ONNX Runtime session of the part of model.onnx after `tensor` (the head)."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    model = onnx.load(str(onnx_path))
    head = Extractor(model).extract_model([tensor], [model.graph.output[0].name])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(head.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
