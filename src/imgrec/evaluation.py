"""Honest evaluation of a bundle on a split it did not train on: accuracy, top-5, per-class
precision/recall/F1/support, the confusion matrix (table and PNG) and the most confident
mistakes. Reads only the bundle."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, atomic_write_text
from .contract import Preprocess, fit_arrays, load_input
from .data.datasets import Dataset, load_dataset
from .errors import DataError
from .figures import pyplot, save_figure
from .predict import Predictor, decode_many
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

    def summary(self) -> dict[str, Any]:
        """The DESIGN.md JSON schema."""
        return {"accuracy": self.accuracy, "top5_accuracy": self.top5_accuracy, "n": self.n,
                "labels": self.labels, "confusion_matrix": self.confusion().tolist(),
                "per_class": self.per_class(), "split": self.split, "dataset": self.dataset,
                "mistakes": self.mistakes(), "skipped": self.skipped}

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
        plt = pyplot()

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

    def write_json(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.summary(), indent=2) + "\n")


def _label_map(bundle: Bundle, ds: Dataset) -> np.ndarray:
    """Dataset label index -> bundle class index, matched by name."""
    index = {c: i for i, c in enumerate(bundle.classes)}
    unknown = [c for c in ds.classes if c not in index]
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
    bundle = model if isinstance(model, Bundle) else open_bundle(model)
    if isinstance(data, str):
        # Re-create the same split the bundle trained with (same seed, same fractions).
        t = bundle.training
        ds = load_dataset(data, data_dir, val_fraction=t.get("val_fraction", 0.1),
                          test_fraction=t.get("test_fraction", 0.1),
                          seed=t.get("seed", 0) if seed is None else seed)
    else:
        ds = data
    split_name, s = ds.split(split)
    mapping = _label_map(bundle, ds)
    predictor = Predictor(bundle, engine=engine, device=device)
    skipped: dict[str, str] = {}
    probs, keep = [], []
    if s.images is not None:
        pixels = fit_arrays(s.images, bundle.preprocess)
        probs.append(predictor.probabilities(pixels, batch_size))
        keep = list(range(len(s)))
        inputs = [f"{_array_marker(ds, split_name)}{i}" for i in range(len(s))]
    else:
        inputs = []
        for start in range(0, len(s), batch_size):
            chunk = s.paths[start : start + batch_size]
            prepared = decode_many(lambda p: decode_evaluated(p, bundle.preprocess), chunk)
            good = [(start + i, p) for i, p in enumerate(prepared) if isinstance(p, np.ndarray)]
            for path, p in zip(chunk, prepared, strict=True):
                if not isinstance(p, np.ndarray):
                    skipped[path] = p.message
            if good:
                probs.append(predictor.probabilities(np.stack([p for _, p in good]), batch_size))
                keep += [i for i, _ in good]
        inputs = [s.paths[i] for i in keep]
    if not keep:
        raise DataError(f"no readable image in {ds.name} {split_name}")
    y_true = mapping[s.labels[np.array(keep)]]
    return EvalReport(list(bundle.classes), y_true, np.concatenate(probs), inputs, split_name,
                      ds.name, skipped)
