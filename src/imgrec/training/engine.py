"""The epoch loop that trains a whole network (scratch and finetune modes): one-cycle
schedule, label smoothing, class weights, mixed precision on CUDA (and bfloat16 on CPUs with
AMX), a data-driven first-layer init (airnet's whitening), airbench's lookahead weight
averaging, validation with the contract's own test-time augmentation, an atomic checkpoint
every epoch and --resume, Ctrl-C / SIGTERM saving the best so far. Everything else
(progress, TensorBoard, early stopping, a user's hooks) is a callback.
"""

from __future__ import annotations

import io
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle import atomic_write_bytes
from ..contract import fit_arrays
from ..errors import ImgrecError, Terminated
from ..predict import available_cores
from . import distributed
from .callbacks import CallbackList, EarlyStopping, RunState
from .loaders import Batches
from .optimizers import optimizer_for
from .plan import RunPlan
from .threads import ThreadGovernor, cpu_flags

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopResult:
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    interrupted: bool
    skipped: dict[str, str] = field(default_factory=dict)
    terminated: bool = False  # by SIGTERM rather than Ctrl-C


def one_cycle(opt, lr: float | list[float], steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle over `steps` optimizer steps. Warm-up is a quarter of the run but at least
    1.5 steps: OneCycleLR divides by zero when its warm-up phase ends on step 0 (<= 4 steps).
    A run of fewer than SHORT_RUN steps has no room for a cycle (2 steps went 4e-5 then
    4e-9 and barely trained): it keeps the peak lr throughout."""
    total = max(2, steps)
    flat = {"div_factor": 1.0, "final_div_factor": 1.0} if total < SHORT_RUN else {}
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                               pct_start=max(0.25, 1.5 / total), **flat)


#: optimizer steps below which one_cycle keeps a constant lr
SHORT_RUN = 10


def class_weights(labels: np.ndarray, n: int, mode: str, device) -> torch.Tensor | None:
    """Balanced weights when the largest class is over 1.5x the smallest (or when asked)."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    if mode == "none" or counts.min() == 0:
        return None
    if mode == "auto" and counts.max() / counts.min() < 1.5:
        return None
    w = counts.sum() / (n * counts)
    return torch.tensor(w, dtype=torch.float32, device=device)


def weights_note(mode: str) -> str:
    """What a run weighing its classes says: why (auto: the classes are imbalanced; asked
    for: --class-weights balanced, whatever the counts)."""
    why = "--class-weights balanced" if mode == "balanced" else "classes are imbalanced"
    return f"{why}: the loss weighs them inversely to their counts (--class-weights none: plain)"


def balanced_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None,
                           smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with label smoothing, each image weighted by its class's weight (the mean
    over the batch's weights). Not F.cross_entropy(weight=...): PyTorch weighs the smoothing
    term's classes too, so a rare class of weight ~40 pulled every image towards it (a class
    of one image made a cats-vs-dogs model worse than chance). Without smoothing the two
    agree."""
    if weights is None:
        return F.cross_entropy(logits, y, label_smoothing=smoothing)
    per_image = F.cross_entropy(logits, y, label_smoothing=smoothing, reduction="none")
    w = weights[y]
    return (per_image * w).sum() / w.sum()


#: how many training images set a whitening layer (airbench uses 5,000)
WHITEN_IMAGES = 5000


def autocast_dtype(precision: str, device: torch.device,
                   flags: set[str] | None = None) -> torch.dtype | None:
    """The autocast dtype for a run, or None for float32.

    CUDA: bfloat16 where supported, else float16 (with a grad scaler). CPU: bfloat16 only with
    AMX (amx_bf16) under "auto". On AVX-512 BF16 without AMX (2 cores, airnet 32/64/128,
    batch 512) autocast was no faster than float32 in the quietest samples (632 vs 603 ms a
    step) and up to 3x slower under load (the casts around every convolution), so those CPUs
    stay in float32. "bf16" forces it where the CPU has any bfloat16 support, else float32."""
    if precision == "fp32" or device.type == "mps":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags or (precision == "bf16" and "avx512_bf16" in flags):
        return torch.bfloat16
    return None


class Lookahead:
    """airbench's lookahead: every 5 steps the weights (and BatchNorm statistics) move to an
    exponential average of themselves, which then replaces them. The average's decay grows
    as the cube of the run's progress (0 at the start, 0.95^5 at the end), so it smooths the
    end of the run, where it pays, and leaves the early steps free."""

    EVERY = 5

    def __init__(self, model: torch.nn.Module, total_steps: int):
        self.total = max(1, total_steps)
        self.steps = 0
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.tensors]

    def step(self, model: torch.nn.Module) -> None:
        self.steps += 1
        if self.steps % self.EVERY == 0:
            decay = 0.95 ** 5 * min(1.0, self.steps / self.total) ** 3
            self._update(decay)

    def finish(self, model: torch.nn.Module) -> None:
        """The network takes the average as it stands (what is saved)."""
        self._update(1.0)

    @torch.no_grad()
    def _update(self, decay: float) -> None:
        torch._foreach_lerp_(self.ema, self.tensors, 1.0 - decay)
        torch._foreach_copy_(self.tensors, self.ema)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ema": self.ema}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.steps = int(saved["steps"])
        for mine, theirs in zip(self.ema, saved["ema"], strict=True):
            mine.copy_(theirs)


def first_images(plan: RunPlan, n: int) -> torch.Tensor | None:
    """Up to n training images as a uint8 batch on the device, in the split's order (in-memory
    data is sliced; files are read a batch at a time)."""
    split = plan.data.splits["train"]
    if split.images is not None:
        pixels = fit_arrays(split.images[:n], plan.contract)
        return torch.from_numpy(pixels).to(plan.device)
    got, count = [], 0
    for x, _, _ in Batches(split, plan.contract, 256, False, plan.device, 0, 0):
        if x is not None:
            got.append(x)
            count += len(x)
        if count >= n:
            break
    return torch.cat(got)[:n] if got else None


class EpochLoop:
    """Trains `model` for plan.epochs. `param_groups` (discriminative learning rates) and
    `train_mode` (frozen BatchNorm) come from the finetune runner; `tracker` may start from
    a warmed-up network."""

    def __init__(self, plan: RunPlan, model: torch.nn.Module, callbacks: CallbackList,
                 tracker: EarlyStopping, param_groups: list[dict] | None = None,
                 train_mode: Any = None):
        self.plan, self.model, self.callbacks, self.tracker = plan, model, callbacks, tracker
        self.resumed_seconds = 0.0  # the training seconds of the epochs a checkpoint brought
        self.train_mode = train_mode or (lambda m: m.train())
        self.channels_last = plan.device.type != "mps"
        if self.channels_last:
            self.model = model.to(memory_format=torch.channels_last)
        ds, seed, workers, world = plan.data, plan.cfg.seed, plan.cfg.workers, plan.world
        self.train_batches = Batches(ds.splits["train"], plan.contract, plan.batch_size, True,
                                     plan.device, seed, workers, world)
        self.val_batches = (Batches(ds.splits["val"], plan.contract, max(256, plan.batch_size),
                                    False, plan.device, seed, workers, world)
                            if plan.has_validation else None)
        # the network each step runs: DDP around the model under torchrun, else the model
        self.step_model = distributed.wrap(self.model, plan) if world.active else self.model
        if world.rank:  # augmentation and dropout draw differently on each rank
            torch.manual_seed(seed + 1_000_003 * world.rank)
        if param_groups is None and hasattr(model, "param_groups"):  # e.g. airnet's two rates
            param_groups = model.param_groups(plan.lr, plan.weight_decay)
        self.opt = optimizer_for(plan.optimizer, param_groups or model.parameters(), plan.lr,
                                 plan.weight_decay, fused=plan.fused_optimizer)
        max_lr = [g["lr"] for g in self.opt.param_groups]  # per group: discriminative rates
        self.sched = one_cycle(self.opt, max_lr if len(max_lr) > 1 else plan.lr,
                               plan.epochs * len(self.train_batches))
        self.weights = class_weights(ds.splits["train"].labels, len(ds.classes),
                                     plan.cfg.class_weights, plan.device)
        self.amp_dtype = autocast_dtype(plan.cfg.precision, plan.device)
        self.amp = self.amp_dtype is not None
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.lookahead = (Lookahead(self.model, plan.epochs * len(self.train_batches))
                          if plan.lookahead else None)
        self.governor = ThreadGovernor(plan.device, available_cores())

    def reported_lr(self) -> float:
        """The rate history and TensorBoard show: the group scheduled at the run's --lr (the
        head's, when finetuning gives the backbone's layers lower rates), else the first."""
        groups = self.opt.param_groups
        return next((g["lr"] for g in groups if math.isclose(g.get("max_lr", -1.0), self.plan.lr)),
                    groups[0]["lr"])

    # -- the run ---------------------------------------------------------------------------
    def run(self, state: RunState) -> LoopResult:
        plan = self.plan
        state.optimizer, state.scheduler, state.epochs = self.opt, self.sched, plan.epochs
        if self.weights is not None:
            self.callbacks.on_note(state, weights_note(plan.cfg.class_weights))
        self._notes(state)
        start = self._resume(state) if plan.cfg.resume else self._init_from_data(state)
        interrupted = False
        self.terminate = False
        old_term = None if plan.world.active else signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for epoch in range(start, plan.epochs + 1):
                self._epoch(state, epoch)
                if self._stop_everywhere(state):
                    self.callbacks.on_note(state, f"early stop: {state.stop_reason}")
                    break
        except KeyboardInterrupt as e:
            if not state.history and not self._started_trained:  # nothing to save
                self.callbacks.on_note(state, "interrupted before the first epoch finished: "
                                              "nothing saved")
                raise
            interrupted = "terminated" if isinstance(e, Terminated) else True
            self.callbacks.on_note(state, "interrupted: saving the best model so far "
                                          "(resume with --resume)")
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            self.governor.restore()
        if not state.history and not self._started_trained:
            raise ImgrecError("training stopped before the first epoch finished; nothing saved")
        state.skipped.update(distributed.gather_dicts(plan.world, state.skipped))
        self.tracker.restore(self.model)
        if plan.cfg.sync_bn:
            distributed.unsync_batchnorm(self.model)
        return LoopResult(state.history, self.tracker.best_epoch, state.stop_training,
                          bool(interrupted), state.skipped, interrupted == "terminated")

    @property
    def _started_trained(self) -> bool:
        """The loop began from a trained network (finetune's warmed-up head, epoch 0 of
        restore-best): an interrupt before the first epoch ends still has a model to save."""
        return self.tracker.best["state"] is not None

    def _stop_everywhere(self, state: RunState) -> bool:
        """Whether to stop: early stopping decides from reduced metrics, so every rank agrees;
        a callback that stops one rank stops them all."""
        if self.plan.world.active:
            stop = distributed.all_sum(self.plan.world, [float(state.stop_training)])[0]
            if stop and not state.stop_training:
                state.stop("another rank's callback stopped the run")
        return state.stop_training

    def _notes(self, state: RunState) -> None:
        """Say what the loop does beyond the recipe line: precision and weight averaging."""
        if self.amp and self.plan.device.type == "cpu":
            self.callbacks.on_note(state, "precision bfloat16 autocast (this CPU has AMX)")
        if self.lookahead is not None:
            self.callbacks.on_note(state, "weights lookahead-averaged (airbench's EMA); the "
                                          "averaged weights are saved")

    def _init_from_data(self, state: RunState) -> int:
        """Networks with `init_from_data` (airnet's whitening layer) are set from up to
        WHITEN_IMAGES training images before the first step; the first epoch to run (1)."""
        init = getattr(self.model, "init_from_data", None)
        if init is None:
            return 1
        x = first_images(self.plan, WHITEN_IMAGES)
        if x is not None:
            init(self.plan.contract.normalize(x))
            self.callbacks.on_note(state, f"init    whitening layer from {len(x)} training "
                                          "images' patch covariance")
        return 1

    def _on_sigterm(self, signum, frame) -> None:
        """A `kill` saves the work as Ctrl-C does, at the next batch boundary (never in the
        middle of writing the checkpoint); a second one stops at once."""
        if self.terminate:
            raise Terminated
        self.terminate = True

    def _check_terminate(self) -> None:
        if self.terminate:
            raise Terminated

    def _epoch(self, state: RunState, epoch: int) -> None:
        t0 = time.time()
        state.epoch = epoch
        self.callbacks.on_epoch_begin(state, epoch)
        loss, acc = self.train_epoch(state, epoch)
        if not state.history:  # the first pass has tried every training file once
            self._check_every_class_taught(state)
        if self.lookahead is not None and epoch == self.plan.epochs:
            self.lookahead.finish(self.model)  # the run's end: the averaged weights
        row = {"epoch": epoch, "lr": self.reported_lr(), "train_loss": loss, "train_acc": acc}
        if self.val_batches is not None:
            row["val_loss"], row["val_acc"] = self.validate(state)
        row["seconds"] = round(time.time() - t0, 2)
        state.history.append(row)
        self.tracker.on_epoch_end(state, epoch, row)
        self.callbacks.on_epoch_end(state, epoch, row)
        for note in self.governor.take_notes():
            self.callbacks.on_note(state, note)
        self._checkpoint(state, epoch)
        self._check_terminate()

    def _check_every_class_taught(self, state: RunState) -> None:
        """A class none of whose training files could be read would still be predicted, never
        having been seen: refused after the first pass (which read every file once). Under
        torchrun each rank saw only its share, so the check is one process's."""
        split = self.plan.data.splits["train"]
        if split.paths is None or self.plan.world.active:
            return
        bad = set(state.skipped)
        check_every_class_taught(self.plan.data.classes, [
            y for p, y in zip(split.paths, split.labels, strict=True) if p not in bad])

    # -- one epoch -------------------------------------------------------------------------
    def _prep(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 batch -> the network's input: augmented (flips and crops stay uint8, so the
        float copy is made once, by normalize), normalised, channels-last."""
        if train:
            x = self.plan.augment(x)
        x = self.plan.contract.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_epoch(self, state: RunState, epoch: int) -> tuple[float, float]:
        """One pass over the training split: (mean loss, accuracy)."""
        self.train_mode(self.model)
        dev = self.plan.device
        logs = {"loss_sum": torch.zeros((), device=dev),
                "correct": torch.zeros((), device=dev, dtype=torch.long), "seen": 0}
        last, padding = len(self.train_batches) - 1, self.train_batches.padding
        for step, (x, y, bad) in enumerate(self.train_batches):
            state.skipped.update(dict(bad))
            if x is not None:
                self._step(x, y, logs, epoch, repeated=padding if step == last else 0)
                logs.update(x=x, y=y)
            elif self.sched.last_epoch < self.sched.total_steps - 1:
                with warnings.catch_warnings():  # "scheduler before optimizer": on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    self.sched.step()  # a batch of unreadable files still moves the schedule
            self.callbacks.on_batch_end(state, step, logs)
            self.governor.tick()
            self._check_terminate()
        loss_sum, correct, seen = logs["loss_sum"].item(), logs["correct"].item(), logs["seen"]
        if self.plan.world.active:  # the whole split's figures, on every rank
            loss_sum, correct, seen = distributed.all_sum(self.plan.world,
                                                          [loss_sum, correct, seen])
        if not seen:
            raise ImgrecError("no training image could be read", "run `imgrec doctor DATA`")
        return loss_sum / seen, correct / seen

    def _step(self, x: torch.Tensor, y: torch.Tensor, logs: dict[str, Any], epoch: int,
              repeated: int = 0) -> None:
        """One optimizer step; the batch's last `repeated` rows (a rank's padding) are
        trained on but left out of the split's loss and accuracy."""
        x = self._prep(x, True)
        with torch.autocast(self.plan.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.step_model(x)
            loss = balanced_cross_entropy(logits.float(), y, self.weights,
                                          self.plan.label_smoothing)
        if not torch.isfinite(loss):
            raise ImgrecError(f"the loss became {loss.item()} at epoch {epoch}",
                              "lower --lr (the run diverged)")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.sched.last_epoch < self.sched.total_steps - 1:
            self.sched.step()
        if self.lookahead is not None:
            self.lookahead.step(self.model)
        # reported as validation is: plain cross-entropy (the smoothed, class-weighted loss
        # optimised is higher by construction, so validation looked better than training)
        keep = max(0, len(y) - repeated)
        logits, y = logits.detach()[:keep].float(), y[:keep]
        logs["loss_sum"] += F.cross_entropy(logits, y, reduction="sum")
        logs["correct"] += (logits.argmax(1) == y).sum()
        logs["seen"] += keep

    @torch.no_grad()
    def validate(self, state: RunState) -> tuple[float, float]:
        """(loss, accuracy) on the validation split, scored as predict scores (the contract's
        TTA); the confusion matrix goes to state.val_confusion (TensorBoard)."""
        self.model.eval()
        n = len(self.plan.data.classes)
        total_loss, correct, seen = 0.0, 0, 0
        cm = torch.zeros(n * n, dtype=torch.long, device=self.plan.device)
        for x, y, bad in self.val_batches:
            state.skipped.update(dict(bad))
            if x is None:
                continue
            with torch.autocast(self.plan.device.type, dtype=self.amp_dtype, enabled=self.amp):
                logits = self.plan.contract.tta_logits(lambda b: self.model(b).float(),
                                                       self._prep(x, False))
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            cm += torch.bincount(y * n + logits.argmax(1), minlength=n * n)
            seen += len(y)
        if self.plan.world.active:  # every rank scored its share: the whole split's figures
            sums = distributed.all_sum(self.plan.world, [total_loss, correct, seen,
                                                         *cm.tolist()])
            total_loss, correct, seen = sums[:3]
            cm = torch.tensor(sums[3:], dtype=torch.long)
        state.val_confusion = cm.view(n, n).cpu().numpy()
        return total_loss / max(seen, 1), correct / max(seen, 1)

    # -- checkpoint and resume -------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.plan.out / CHECKPOINT

    def _checkpoint(self, state: RunState, epoch: int) -> None:
        """Everything needed to resume, written atomically (a crash keeps the last one); by
        rank 0 alone under torchrun."""
        if not self.plan.world.main:
            return
        best = self.tracker.best
        payload = {
            "fingerprint": self.plan.fingerprint(), "epoch": epoch, "history": state.history,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "best_acc": best["acc"],
            "best_loss": best["loss"], "best_epoch": best["epoch"],
            "best_state": best["state"], "skipped": state.skipped,
            "rng": torch.get_rng_state(), "batches": self.train_batches.state_dict(),
            "bad_epochs": self.tracker.bad_epochs,
            "lookahead": self.lookahead.state_dict() if self.lookahead else None,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())
        distributed.checkpointed(epoch)

    def _resume(self, state: RunState) -> int:
        """Load the checkpoint in --out; the epoch to continue from."""
        saved = _shared_checkpoint(self.checkpoint_path, self.plan)
        self.model.load_state_dict(saved["model"])
        # the schedule's bounds in the optimizer's groups are this run's (another --epochs
        # may turn a flat short run into a cycle), not the checkpoint's
        keys = ("initial_lr", "max_lr", "min_lr")
        bounds = [{k: g[k] for k in keys if k in g} for g in self.opt.param_groups]
        self.opt.load_state_dict(saved["optimizer"])
        for group, own in zip(self.opt.param_groups, bounds, strict=True):
            group.update(own)
        _restore_schedule(self.sched, saved["scheduler"])
        torch.set_rng_state(saved["rng"].cpu())
        if saved.get("batches"):  # (a checkpoint of an earlier imgrec has none)
            self.train_batches.load_state_dict(saved["batches"])
        self.tracker.bad_epochs = int(saved.get("bad_epochs", 0))
        if self.lookahead is not None and saved.get("lookahead"):
            self.lookahead.load_state_dict(saved["lookahead"])
        self.tracker.best = {"acc": saved["best_acc"], "loss": saved["best_loss"],
                             "epoch": saved["best_epoch"], "state": saved["best_state"]}
        state.history[:] = saved["history"]
        self.resumed_seconds = float(sum(r.get("seconds") or 0.0 for r in saved["history"]))
        state.skipped.update(saved.get("skipped", {}))
        done, epochs = saved["epoch"], self.plan.epochs
        self.callbacks.on_note(state, f"resume  from epoch {done} of {epochs}" if done < epochs
                               else f"resume  the checkpoint has {done} epochs, --epochs is "
                                    f"{epochs}: nothing left to train (raise --epochs to go on)")
        return saved["epoch"] + 1


def _read_checkpoint(path: Path, plan: RunPlan, device: torch.device | None = None) -> dict:
    if not path.is_file():
        raise ImgrecError(f"--resume: no checkpoint at {path}",
                          "give the --out folder of the interrupted run")
    try:
        saved = torch.load(path, map_location=device or plan.device, weights_only=True)
    except Exception as e:
        raise ImgrecError(f"--resume: {path} is unreadable ({e})",
                          "start again without --resume") from None
    if not _same_run(saved.get("fingerprint"), plan.fingerprint()):
        raise ImgrecError(
            "--resume: the checkpoint was made with other data, model or settings ("
            + _fingerprint_changes(saved.get("fingerprint"), plan.fingerprint()) + ")",
            "repeat the original command with --resume, or train into another --out",
        )
    return saved


#: how a resume refusal names each part of the fingerprint
_FINGERPRINT_NAMES = {"seed": "--seed", "data": "the data", "model": "--model",
                      "model_args": "the model's options", "image_size": "--image-size",
                      "batch_size": "--batch-size", "world_size": "--nproc",
                      "optimizer": "--optimizer", "lr": "--lr",
                      "weight_decay": "--weight-decay", "label_smoothing": "--label-smoothing",
                      "augment": "--augment"}
#: parts a checkpoint of an earlier imgrec may lack (not compared when it does)
_LATER_PARTS = ("seed", "optimizer", "lr", "weight_decay", "label_smoothing", "augment")


def check_every_class_taught(classes: list[str], read_labels: Any) -> None:
    """Refuse a class no readable training image teaches (the network would still predict
    it): `read_labels`, the labels of the training images that could be read."""
    taught = {int(y) for y in read_labels}
    untaught = [c for i, c in enumerate(classes) if i not in taught]
    if untaught:
        names = ", ".join(repr(c) for c in untaught)
        raise ImgrecError(f"class(es) {names}: none of their training images could be read",
                          "run `imgrec doctor DATA` to see the unreadable files")


def _fingerprint_changes(saved: Any, now: dict) -> str:
    """What differs between a checkpoint's fingerprint and this run's, in words."""
    if not isinstance(saved, dict):
        return "the checkpoint records none"
    out, keys = [], set(saved) | set(now)
    reseeded = "seed" in saved and saved["seed"] != now.get("seed")
    for key in list(_FINGERPRINT_NAMES) + sorted(keys - set(_FINGERPRINT_NAMES)):
        if saved.get(key) == now.get(key) or (key in _LATER_PARTS and key not in saved):
            continue
        name = _FINGERPRINT_NAMES.get(key, key)
        if key == "data":
            out.append("so the data's splits" if reseeded else
                       "the data: its images, labels or splits changed")
        elif key == "world_size":
            shown = [f"{n} processes" if n else "one process"
                     for n in (saved.get(key), now.get(key))]
            out.append(f"{name}: {shown[0]}, now {shown[1]}")
        else:
            out.append(f"{name} {saved.get(key)!r}, now {now.get(key)!r}")
    return "; ".join(out) or "unknown"


def _same_run(saved: Any, now: dict) -> bool:
    """A checkpoint's fingerprint matches this run's (parts an earlier imgrec did not record
    are not compared)."""
    if not isinstance(saved, dict):
        return False
    return saved == {k: v for k, v in now.items() if k in saved or k not in _LATER_PARTS}


def _shared_checkpoint(path: Path, plan: RunPlan) -> dict:
    """The checkpoint; under torchrun rank 0 reads it and sends it to every rank (no shared
    file system needed), or the error every rank then raises (rank 0 prints it)."""
    if not plan.world.active:
        return _read_checkpoint(path, plan)
    saved: Any = None
    if plan.world.main:
        try:
            saved = _read_checkpoint(path, plan, torch.device("cpu"))
        except ImgrecError as e:
            saved = e
    saved = distributed.broadcast(plan.world, saved)
    if isinstance(saved, ImgrecError):
        raise saved
    distributed.checkpointed(saved["epoch"])
    return saved


def _restore_schedule(sched, saved: dict) -> None:
    """The saved one-cycle position; with another --epochs the schedule stretches to the
    new length."""
    if saved.get("total_steps") == sched.total_steps:
        sched.load_state_dict(saved)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = min(int(saved.get("last_epoch", 0)), sched.total_steps - 1)
        while sched.last_epoch < target:
            sched.step()
