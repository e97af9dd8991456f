"""One background training per project, on cached EfficientNet-Lite features (features mode
of imgrec's training API, so a retraining after adding a few photos only computes theirs).

The bundle is written into a temporary folder beside the project's model and renamed into
place when the run succeeded, so `DIR/<project>/model/` is always the last good model. A
`training.json` marker is kept while a run is going; a studio restarted mid-training finds it
and reports the run as failed (its temporary folder removed), never a half-written model.
Torch and imgrec.training are imported only when a training starts.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..bundle import atomic_write_bytes
from ..errors import DataError
from .store import TRAINING_MARKER, Conflict, Store

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class TrainOptions:
    backbone: str = "efficientnet_lite0"
    epochs: int | None = None
    augment_views: int = 0
    val_fraction: float = 0.34  # a third: 20 validation photos of 2 x 30


@dataclass
class TrainStatus:
    state: str = "idle"  # idle | running | done | failed
    progress: float = 0.0
    val_accuracy: float | None = None
    message: str = ""
    seconds: float | None = None
    #: after a training: labels, confusion_matrix (rows true) and per-class recall on the
    #: validation photos (imgrec evaluate's figures)
    validation: dict[str, Any] | None = None


class Progress:
    """The training callback: notes and epochs become the project's live status."""

    def __init__(self, status: TrainStatus):
        self.status = status
        self.clock = time.monotonic
        self.epochs_began: float | None = None  # the clock at the first epoch's start
        self.epochs_from = 0.1  # the bar's place when the epochs began

    #: the share of the bar for the backbone's features (most of a studio run's time: the
    #: head's epochs on cached features are quick)
    EXTRACTION = 0.5

    def on_epoch_begin(self, state: Any, epoch: int) -> None:
        if self.epochs_began is None:
            self.epochs_began = self.clock()
            self.epochs_from = max(0.1, self.status.progress)

    def on_extract(self, state: Any, done: int, total: int) -> None:
        share = done / max(1, total)
        self.status.progress = round(max(self.status.progress, self.EXTRACTION * share), 3)
        self.status.message = f"features: {done}/{total} photos"

    def on_note(self, state: Any, message: str) -> None:
        self.status.message = " ".join(message.split())
        if self.status.progress < 0.1 and "feature" in message:
            self.status.progress = 0.1
        if message.startswith("head"):  # the head is trained: the bundle is being written
            self.status.progress = max(self.status.progress, 0.9)

    def on_epoch_end(self, state: Any, epoch: int, logs: dict[str, Any]) -> None:
        total = max(1, state.epochs or 1)
        start = self.epochs_from
        self.status.progress = round(min(0.95, start + (0.95 - start) * epoch / total), 3)
        self.status.message = (f"epoch {epoch}/{total}: val_acc {logs.get('val_acc') or 0:.3f}"
                               + time_left(self.epochs_began, epoch, total, self.clock()))

    def on_train_end(self, state: Any, logs: dict[str, Any]) -> None:
        self.status.progress = max(self.status.progress, 0.9)
        self.status.message = "writing the model and its checked model.onnx"


def time_left(began: float | None, done: int, total: int, now: float) -> str:
    """", about N s left" at the epochs' mean pace so far (early stopping may end sooner);
    nothing before the first epoch has ended or after the last."""
    if began is None or done < 1 or done >= total:
        return ""
    left = (now - began) / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


def best_val_accuracy(history: list[dict], best_epoch: int | None) -> float | None:
    """The validation accuracy of the epoch that was kept (early stopping restores it)."""
    rows = [r for r in history if r.get("val_acc") is not None]
    if not rows:
        return None
    kept = [r for r in rows if r.get("epoch") == best_epoch] or rows[-1:]
    return round(float(kept[0]["val_acc"]), 4)


class Trainer:
    """The projects' trainings: at most one running per project, each in its own thread."""

    def __init__(self, store: Store):
        self.store = store
        self.status: dict[str, TrainStatus] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()
        self.quantizing_now: set[str] = set()  # projects whose int8 model is being made

    def get(self, project: str) -> TrainStatus:
        path = self.store.project(project)
        with self.lock:
            if project not in self.status:
                self.status[project] = self._recovered(path)
            return self.status[project]

    def _recovered(self, path: Path) -> TrainStatus:
        """A project's status after a (re)start: an interrupted run is failed and cleaned up."""
        for tmp in path.glob(".model-*"):
            if tmp.name.startswith(".model-old-") and not (path / "model").exists():
                tmp.rename(path / "model")  # stopped between the two renames
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        marker = path / TRAINING_MARKER
        model = (path / "model" / "imgrec.json").is_file()
        if marker.exists():
            marker.unlink()
            return TrainStatus("failed", 0.0, None, "the training was interrupted by a "
                               "restart; the last good model is kept" if model else
                               "the training was interrupted by a restart")
        done = json.loads((path / "model" / "studio.json").read_text()) if model and (
            path / "model" / "studio.json").is_file() else None
        if done:
            return TrainStatus("done", 1.0, done.get("val_accuracy"), "last good model",
                               validation=done.get("validation"))
        return TrainStatus()

    def start(self, project: str, options: TrainOptions) -> TrainStatus:
        path = self.store.project(project)
        self._check_trainable(project)
        self.get(project)
        with self.lock:
            busy = self.threads.get(project)
            if self.status[project].state == "running" or (busy and busy.is_alive()):
                raise Conflict(f"project {project!r} is training already; wait for it to end")
            if project in self.quantizing_now:
                raise Conflict(f"project {project!r}'s model is being quantized for an int8 "
                               "download; train again when it is done (under a minute)")
            status = self.status[project] = TrainStatus("running", 0.0, None, "starting")
            (path / TRAINING_MARKER).write_text(json.dumps(asdict(options)))
        thread = threading.Thread(target=self._run, args=(path, options, status),
                                  name=f"studio-train-{project}", daemon=True)
        self.threads[project] = thread
        thread.start()
        return status

    @contextmanager
    def quantizing(self, project: str) -> Iterator[None]:
        """Hold the project while its model is quantized (int8 download): refused while it
        trains, and a training (or a second quantization) is refused until it is done, so
        the model folder is never swapped under the quantizer."""
        self.get(project)
        with self.lock:
            busy = self.threads.get(project)
            if self.status[project].state == "running" or (busy and busy.is_alive()):
                raise Conflict(f"project {project!r} is training; download its int8 model "
                               "when the training has ended")
            if project in self.quantizing_now:
                raise Conflict(f"project {project!r}'s model is being quantized already",
                               "download it again in a moment")
            self.quantizing_now.add(project)
        try:
            yield
        finally:
            with self.lock:
                self.quantizing_now.discard(project)

    def _check_trainable(self, project: str) -> None:
        """Two classes or more, each with an image: refused at once (400), not a run that
        fails after the request was accepted."""
        counts = {c: len(files) for c, files in self.store.classes(project).items()}
        empty = [c for c, n in counts.items() if not n]
        if empty:
            raise DataError(f"class {', '.join(repr(c) for c in empty)} of project {project!r} "
                            "has no images", "add images to it, or delete the class")
        if len(counts) < 2:
            raise DataError(f"project {project!r} has {len(counts)} class(es); a classifier "
                            "needs two or more", "add a class and its images")

    def _run(self, path: Path, options: TrainOptions, status: TrainStatus) -> None:
        start = time.perf_counter()
        tmp = path / f".model-{uuid.uuid4().hex[:8]}"
        try:
            accuracy = train_bundle(path / "data", tmp, options, Progress(status))
            (tmp / "studio.json").write_text(json.dumps({"val_accuracy": accuracy}))
            put_in_place(tmp, path / "model")
        except Exception as e:  # the page shows why (no server path); the last good model stays
            why = (str(e) or type(e).__name__).replace(str(path / "data"), "the project")
            status.state, status.message = "failed", why.replace(str(path), "the project")
            shutil.rmtree(tmp, ignore_errors=True)
            return
        finally:
            status.seconds = round(time.perf_counter() - start, 2)
            (path / TRAINING_MARKER).unlink(missing_ok=True)
        status.val_accuracy, status.message = accuracy, "the model is ready"
        status.progress, status.state = 1.0, "done"
        # the model is usable now; the confusion matrix follows (the page polls for it)
        status.validation = validation_figures(path / "model", path / "data")
        atomic_write_bytes(path / "model" / "studio.json", json.dumps(
            {"val_accuracy": accuracy, "validation": status.validation}).encode())

    def wait(self, project: str, timeout: float | None = None) -> None:
        thread = self.threads.get(project)
        if thread is not None:
            thread.join(timeout)


def train_bundle(data: Path, out: Path, options: TrainOptions, progress: Progress) -> float | None:
    """Features mode on the chosen EfficientNet-Lite; the kept epoch's validation accuracy."""
    from ..training.api import plan
    from ..training.runners import run_plan

    if options.backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}")
    extra = {"epochs": options.epochs} if options.epochs else {}
    run = plan(str(data), model=options.backbone, mode="features", out=str(out), quiet=True,
               tensorboard=False, val_fraction=options.val_fraction, test_fraction=0.0,
               augment_views=options.augment_views, **extra)
    best: dict[str, Any] = {}

    class Ended:
        def on_train_end(self, state: Any, logs: dict[str, Any]) -> None:
            best.update(logs)

    result = run_plan(run, [progress, Ended()])
    return best_val_accuracy(result.history, best.get("best_epoch"))


def validation_figures(bundle: Path, data: Path) -> dict[str, Any] | None:
    """`imgrec evaluate BUNDLE DATA --split val`'s confusion matrix and per-class recall (the
    split re-created from the bundle's record; scored from the feature cache)."""
    from ..evaluation import evaluate_bundle

    try:
        report = evaluate_bundle(bundle, str(data), split="val")
    except Exception:  # noqa: BLE001 (no validation split: nothing to show)
        return None
    per_class = report.per_class()
    return {"labels": report.labels, "confusion_matrix": report.confusion().tolist(),
            # null for a class with no validation photo (0.0 would read as all wrong)
            "per_class_accuracy": {k: round(v["recall"], 4) if v["support"] else None
                                   for k, v in per_class.items()}}


def put_in_place(new: Path, model: Path) -> None:
    """Rename the new bundle over the old one: the old is moved aside first and removed only
    after the new one is in place."""
    old = model.with_name(f".model-old-{uuid.uuid4().hex[:8]}")
    if model.exists():
        model.rename(old)
    new.rename(model)
    shutil.rmtree(old, ignore_errors=True)
