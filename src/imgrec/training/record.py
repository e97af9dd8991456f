"""The record of a training run: the bundle with its training summary, history.csv,
curves.png, config.json (RecordWriter) and TensorBoard logs."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..bundle import Bundle, atomic_write_text, write_training_digests
from ..figures import drawing, missing_glyphs_quiet
from ..history import plot_curves, write_history


class TensorBoard:
    """Scalars per epoch (losses, accuracies, the learning rate), a sample batch of training
    images as the model sees them (after augmentation), and the validation confusion matrix
    per epoch; created lazily so a run without it pays no import."""

    #: more classes than this and the per-epoch confusion image is skipped (unreadable, slow)
    MAX_CONFUSION_CLASSES = 50

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.has_batch = False

    def sample_batch(self, x, y, classes: list[str], step: int = 0, limit: int = 32) -> None:
        """x: float N x C x H x W with pixel values 0..255 (augmented, not yet normalised)."""
        k = min(limit, len(x))
        imgs = (x[:k].detach().float().cpu() / 255.0).clamp(0, 1)
        self.writer.add_images("train/sample_batch", imgs, step, dataformats="NCHW")
        labels = [classes[int(i)] for i in y[:k].tolist()]
        self.writer.add_text("train/sample_batch_labels",
                             ", ".join(f"{i}: {lab}" for i, lab in enumerate(labels)), step)
        self.has_batch = True

    def confusion(self, cm, classes: list[str], step: int) -> None:
        """The validation confusion matrix as an image (rows true, columns predicted)."""
        if cm is None or len(classes) > self.MAX_CONFUSION_CLASSES:
            return
        plt = drawing()

        n = len(classes)
        size = min(12, max(4, 0.45 * n + 2))
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Validation confusion matrix, epoch {step}")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        with missing_glyphs_quiet():  # a class named in emoji: boxes, not a warning each epoch
            fig.tight_layout()
            # a bare Figure: nothing to close (close=True imports pyplot to do it)
            self.writer.add_figure("val/confusion_matrix", fig, step, close=False)

    def epoch(self, row: dict, prefix: str = "") -> None:
        """A history row's figures as scalars (val_acc -> acc/val), their tags behind
        `prefix` (finetune's warm-up: "warmup/")."""
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                group, _, name = key.partition("_")
                tag = f"{name or group}/{group}" if name else key
                self.writer.add_scalar(prefix + tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RecordWriter:
    """The one writer of a run's record, whatever the mode: the bundle (weights, and
    imgrec.json with the training summary and test metrics), history.csv, curves.png and
    config.json."""

    def __init__(self, plan: Any):
        self.plan = plan
        self.curves: Background | None = None

    def summary(self, history: list[dict], best_epoch: int, seconds: float,
                stopped_early: bool, interrupted: bool, skipped: dict[str, str],
                **extra: Any) -> dict[str, Any]:
        """imgrec.json's "training": what ran, on what, how long, how it ended."""
        import torch

        from .. import _version

        p, ds = self.plan, self.plan.data
        return {
            "data": p.cfg.data, **data_location(p.cfg.data, p.cfg.data_dir),
            "dataset": ds.name, "data_fingerprint": ds.fingerprint(),
            "splits": {k: len(v) for k, v in ds.splits.items()},
            "val_fraction": p.val_fraction, "test_fraction": p.test_fraction, "mode": p.mode,
            "epochs_run": len(history), "epochs": p.epochs, "best_epoch": best_epoch,
            "batch_size": p.batch_size, "processes": p.world.size,
            "global_batch": p.global_batch, "lr": p.lr, "optimizer": p.optimizer,
            "label_smoothing": p.label_smoothing, "weight_decay": p.weight_decay,
            "patience": p.patience, "class_weights": p.cfg.class_weights,
            "augment": p.augment.describe(),
            "seed": p.cfg.seed, "seconds": round(seconds, 1), "device": str(p.device),
            "stopped_early": stopped_early, "interrupted": interrupted,
            "skipped_files": len(skipped), "imgrec_version": _version.__version__,
            "torch_version": torch.__version__, **extra,
        }

    def save(self, model: Any, arch: dict[str, Any], history: list[dict],
             training: dict[str, Any], title: str, warmup: list[dict] | None = None) -> Bundle:
        """Write the bundle and the record beside it; `warmup`: finetune's head warm-up
        epochs, recorded before the finetuning's with a `stage` column (the kept model may
        be the warm-up's)."""
        from ..network import save_bundle

        if warmup:
            history = [{"stage": "warmup", **row} for row in warmup] + \
                      [{"stage": "finetune", **row} for row in history]
        p = self.plan
        bundle = Bundle(p.out, arch, list(p.data.classes), p.contract, training=training)
        save_bundle(bundle, model)
        write_history(p.out / "history.csv", history)
        # drawn while the test split is scored and model.onnx exported (importing matplotlib
        # and drawing take ~0.5 s, 5% of a whole MNIST run); `finish` waits for it
        self.curves = Background(plot_curves, p.out / "curves.png", list(history), title)
        atomic_write_text(p.out / "config.json",
                          json.dumps(asdict(p.cfg), indent=2, default=str) + "\n")
        train = p.data.splits.get("train")
        if train is not None and train.paths is not None:  # image files, not arrays
            write_training_digests(p.out, train.paths)
        return bundle

    def finish(self) -> None:
        """Wait for the record's background work (curves.png). A drawing that failed is
        drawn again here, and if that fails too the run says so in one line: a figure is
        never worth the run (Ctrl-C during the main thread's import of matplotlib left the
        drawing thread a half-imported module, and the internal error lost the checkpoint)."""
        curves, self.curves = self.curves, None
        if curves is None:
            return
        try:
            curves.join()
        except Exception:  # noqa: BLE001 (a figure)
            try:
                curves.again()
            except Exception as e:  # noqa: BLE001
                print(f"warning: curves.png was not drawn ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)

    @staticmethod
    def write_onnx(bundle: Bundle, model: Any, composed: Callable[[], Path] | None = None
                   ) -> str | None:
        """model.onnx in the bundle at the end of training, checked against PyTorch on real
        photos as `imgrec export` checks it, so evaluate, predict and serve run ONNX Runtime at
        once. `composed` builds the file from parts already exported (features mode); when it
        fails, the whole network is exported. Returns how it was made ("composed", "exported"),
        or None after one warning line: the bundle then has no model.onnx and runs in PyTorch.
        """
        from ..errors import ModelError
        from ..export import adopt_onnx, export_bundle, first_line

        def export() -> None:
            bundle.extra = export_bundle(bundle.path, network=model).bundle.extra

        attempts = [("exported", export)]
        if composed is not None:
            attempts.insert(0, ("composed", lambda: adopt_onnx(bundle, composed(), model)))
        t0, how = time.perf_counter(), None
        for name, attempt in attempts:
            try:
                attempt()
                how = name
                break
            except Exception as e:  # noqa: BLE001 (whatever the failure, the bundle survives)
                error = e
                _drop_onnx(bundle)
        if how is None:
            reason = (error.message if isinstance(error, ModelError)
                      else f"{type(error).__name__}: {first_line(error)}")
            print(f"warning: no model.onnx ({reason}); the bundle runs in PyTorch (`imgrec "
                  "export` retries)", file=sys.stderr, flush=True)
        bundle.training["onnx_seconds"] = round(time.perf_counter() - t0, 2)
        bundle.write_meta()
        return how

    @staticmethod
    def add_test_metrics(bundle: Bundle, metrics: dict[str, Any], skipped: int) -> None:
        bundle.metrics = {"test": metrics}
        bundle.training["skipped_files"] = skipped
        bundle.write_meta()


class Background:
    """`fn(*args)` in a thread; `join` waits for it and raises what it raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.error: BaseException | None = None
        self.fn, self.args = fn, args
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                       name=f"imgrec-{getattr(fn, '__name__', 'task')}")
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the joining thread)
            self.error = e

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def again(self) -> None:
        """The work once more, in the calling thread."""
        self.fn(*self.args)


def _drop_onnx(bundle: Bundle) -> None:
    """After a failed export: no model.onnx (nor its record) that was not checked."""
    from ..bundle import EXPORT_KEY

    bundle.onnx_path.unlink(missing_ok=True)
    bundle.extra.pop(EXPORT_KEY, None)
    bundle.write_meta()


def data_location(data: str, data_dir: str | None) -> dict[str, str]:
    """Where the training data is, for a later `imgrec export --int8` (calibration) run from
    another folder: a folder or CSV's absolute path, and the --data-dir a built-in dataset was
    read from."""
    out = {}
    if data_dir:
        out["data_dir"] = str(Path(data_dir).expanduser().resolve())
    local = Path(str(data)).expanduser()
    if local.exists() and not local.is_absolute():
        out["data_path"] = str(local.resolve())
    return out

