"""Callbacks: how progress bars, TensorBoard, checkpoints, early stopping and anything else
(a web page showing progress, a tuner pruning trials, a distributed launcher) hook into a
training run without touching the loop.

Every runner (scratch, features, finetune) calls the same hooks with a RunState. A callback
stops the run by setting `state.stop_training = True` (Keras' way): the epoch in progress
ends, the best model is restored and the bundle is written as for any early stop.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunState:
    """What a run exposes to its callbacks. `model` is the network being trained (for the
    features mode: the head on the cached features); `optimizer` and `scheduler` are set by
    the epoch loop."""

    plan: Any
    model: Any = None
    epochs: int = 0
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    stop_training: bool = False
    stop_reason: str | None = None
    optimizer: Any = None
    scheduler: Any = None
    skipped: dict[str, str] = field(default_factory=dict)
    val_confusion: Any = None
    tracker: EarlyStopping | None = None
    stage: str = "train"  # "head" while the features / warm-up head trains

    def stop(self, reason: str) -> None:
        self.stop_training, self.stop_reason = True, reason


class Callback:
    """Override the hooks you need. `logs` on a batch: the batch's inputs `x` (uint8, after
    augmentation is drawn later), labels `y`, and the epoch's running `loss_sum` / `correct`
    / `seen` (tensors: reading them syncs a GPU, so do it sparingly); on an epoch: the
    history row (epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds); at the end:
    history, best_epoch, stopped_early, interrupted and the test metrics."""

    def on_train_begin(self, state: RunState) -> None: ...

    def on_epoch_begin(self, state: RunState, epoch: int) -> None: ...

    def on_batch_end(self, state: RunState, batch: int, logs: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: RunState, epoch: int, logs: dict[str, Any]) -> None: ...

    def on_train_end(self, state: RunState, logs: dict[str, Any]) -> None: ...

    def on_extract(self, state: RunState, done: int, total: int) -> None:
        """Transfer modes, before the epochs: `done` of the run's `total` images have their
        backbone features (from the cache, or computed); a long wait a page can show."""

    def on_note(self, state: RunState, message: str) -> None:
        """A line about the run (data, model, cache, early stop...): ProgressPrinter prints it."""


class CallbackList:
    """Calls a hook on each callback in order. A callback needs only the hooks it uses (any
    object with an `on_epoch_end` method will do)."""

    def __init__(self, callbacks: list[Any]):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args: Any) -> None:
            for cb in self.callbacks:
                method = getattr(cb, hook, None)
                if method is not None:
                    method(*args)

        return call


class EarlyStopping(Callback):
    """Tracks the best epoch (validation accuracy, then lower validation loss; training
    figures without a validation split), keeps a copy of its weights for restore-best, and
    stops the run after `patience` epochs without gain (0: never; only with validation).
    The one tracker every runner shares."""

    def __init__(self, patience: int = 0, has_validation: bool = True):
        self.patience, self.has_validation = patience, has_validation
        self.best: dict[str, Any] = {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": None}
        self.bad_epochs = 0

    def start_from(self, acc: float, loss: float, model: Any, epoch: int = 0) -> None:
        """A network that is already trained (the warmed-up head) counts as `epoch`."""
        self.best = {"acc": acc, "loss": loss, "epoch": epoch,
                     "state": copy.deepcopy(model.state_dict())}

    def on_epoch_end(self, state: RunState, epoch: int, logs: dict[str, Any]) -> None:
        score = (logs.get("val_acc", logs["train_acc"]), -logs.get("val_loss", logs["train_loss"]))
        if score > (self.best["acc"], -self.best["loss"]):
            self.best = {"acc": score[0], "loss": -score[1], "epoch": epoch,
                         "state": copy.deepcopy(state.model.state_dict())}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        last = epoch >= getattr(getattr(state, "plan", None), "epochs", math.inf)
        if self.has_validation and self.patience and self.bad_epochs >= self.patience \
                and not last:  # the run ends anyway: no early stop to report
            state.stop(f"no validation gain for {self.patience} epochs")

    def restore(self, model: Any) -> None:
        """Load the best epoch's weights (with a validation split: else the last are best)."""
        if self.best["state"] is not None and self.has_validation:
            model.load_state_dict(self.best["state"])

    @property
    def best_epoch(self) -> int:
        return self.best["epoch"]


class ProgressPrinter(Callback):
    """The command line's progress: notes, a tqdm bar per epoch and one line per epoch, on
    stderr (stdout stays for results and --json)."""

    def __init__(self, stream: Any = None, head_every: int = 10):
        self.stream, self.head_every, self.bar = stream or sys.stderr, head_every, None

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def on_note(self, state: RunState, message: str) -> None:
        if self.bar is not None:  # a note mid-epoch (an interrupt): on its own line, not
            self.bar.close()      # glued to the bar's
            self.bar = None
        self._print(message)

    def on_epoch_begin(self, state: RunState, epoch: int) -> None:
        if state.stage != "train":
            return
        from tqdm import tqdm

        self.bar = tqdm(total=state.plan.steps_per_epoch, desc=f"epoch {epoch}/{state.epochs}",
                        leave=False, unit="batch", dynamic_ncols=True, file=self.stream)

    def on_batch_end(self, state: RunState, batch: int, logs: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        # every 20th batch (reading the sums waits for the device), or a tenth of a short
        # epoch's (an 18-batch epoch showed its first batch's figures throughout)
        every = max(1, min(20, int(self.bar.total or 0) // 10))
        if batch % every == 0 and int(logs["seen"]):
            seen = int(logs["seen"])
            self.bar.set_postfix(loss=f"{float(logs['loss_sum']) / seen:.4f}",
                                 acc=f"{int(logs['correct']) / seen:.4f}")

    def on_epoch_end(self, state: RunState, epoch: int, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        head = state.stage == "head"
        # the head's epochs are many and cheap: every head_every-th, the first and the last
        # (a 3-epoch head printed epoch 1 alone)
        if head and not (epoch % self.head_every == 0 or epoch in (1, state.epochs)):
            return
        msg = f"{'head epoch' if head else 'epoch'} {epoch}/{state.epochs}  " \
              f"loss {logs['train_loss']:.4f}  acc {logs['train_acc']:.4f}"
        if "val_acc" in logs:
            msg += f"  val_loss {logs['val_loss']:.4f}  val_acc {logs['val_acc']:.4f}"
        self._print(msg if head else msg + f"  ({logs['seconds']:.1f}s)")

    def on_train_end(self, state: RunState, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardLogger(Callback):
    """Scalars per epoch, one training batch as the model sees it (augmented) and the
    validation confusion matrix, in the bundle folder (training/record.py's writer)."""

    #: the names TensorBoard gives its event files
    EVENTS = "events.out.tfevents.*"

    def __init__(self, log_dir: Path):
        self.log_dir, self.tb = Path(log_dir), None
        self.replaced: list[Path] = []
        self.before: set[Path] = set()

    def on_train_begin(self, state: RunState) -> None:
        from .record import TensorBoard

        # A new run into a bundle's folder replaces that bundle: its old curves go when the
        # new bundle is written (TensorBoard would draw both runs over the same steps). A
        # resumed run continues its own curves.
        self.before = set(self.log_dir.glob(self.EVENTS))
        self.replaced = [] if state.plan.cfg.resume else sorted(self.before)
        self.tb = TensorBoard(self.log_dir)


    def on_batch_end(self, state: RunState, batch: int, logs: dict[str, Any]) -> None:
        if self.tb is None or self.tb.has_batch or "x" not in logs:
            return
        import torch

        plan = state.plan
        cuda = [plan.device.index or 0] if plan.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the same training with or without it
            self.tb.sample_batch(plan.augment(logs["x"].float()), logs["y"], plan.data.classes,
                                 state.epoch)

    def on_epoch_end(self, state: RunState, epoch: int, logs: dict[str, Any]) -> None:
        if self.tb is None:
            return
        # finetune's head warm-up has its own curves: its epochs 1..N would otherwise be drawn
        # over the finetuning's own 1..M on the same tags
        warmup = state.stage == "head" and getattr(state.plan, "mode", None) == "finetune"
        if warmup and state.plan.cfg.resume:  # a resumed run's warm-up repeats the logged one
            return
        self.tb.epoch(logs, prefix="warmup/" if warmup else "")
        if state.val_confusion is not None and state.stage == "train":
            self.tb.confusion(state.val_confusion, state.plan.data.classes, epoch)

    def on_train_end(self, state: RunState, logs: dict[str, Any]) -> None:
        # a bundle was written (an epoch ran, or finetune kept its warm-up): it replaced the
        # old one, whose curves go; else this run's own events go (a refused --resume)
        saved = bool(logs.get("history")) or "best_epoch" in logs
        if saved:
            for old in self.replaced:
                old.unlink(missing_ok=True)
        self.replaced = []
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            if not saved:
                for mine in set(self.log_dir.glob(self.EVENTS)) - self.before:
                    mine.unlink(missing_ok=True)
