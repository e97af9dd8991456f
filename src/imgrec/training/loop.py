"""`imgrec train`: data -> model -> a bundle, with a one-cycle schedule, label smoothing,
early stopping with restore-best, an atomic checkpoint every epoch and --resume, a live
progress bar, history.csv / curves.png / TensorBoard, and a report of skipped files.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..augment import Augment
from ..bundle import Bundle, atomic_write_bytes
from ..contract import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from ..data.datasets import Dataset, builtin_key, load_dataset
from ..errors import ImgrecError, skipped_report
from ..history import plot_curves, write_history
from ..models.registry import MODELS, build_model, resolve_model_name
from ..network import save_bundle
from .loaders import Batches
from .recipes import BUILTIN_RECIPES, recipe_for
from .record import TensorBoard

CHECKPOINT = "checkpoint.pt"
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")


@dataclass
class TrainConfig:
    """Everything a run needs. None means 'the recipe decides'."""

    data: str
    model: str | None = None
    mode: str | None = None  # None/"auto": pretrained backbone + image files -> features
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int | None = None
    augment: str | None = None
    out: str | None = None
    seed: int = 0
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    patience: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    class_weights: str = "auto"
    invert: str | None = None
    resume: bool = False
    data_dir: str | None = None
    workers: int | None = None
    device: str | None = None
    quiet: bool = False
    tensorboard: bool = True
    tta: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # timm hub weights for --model (transfer modes)
    weights: str | None = None  # a local safetensors / state-dict file for --model
    head: str = "linear"  # transfer head: linear or mlp
    augment_views: int = 0  # cached augmented views per training image (features mode)


@dataclass
class TrainResult:
    bundle: Bundle
    history: list[dict]
    skipped: dict[str, str]
    test_metrics: dict[str, Any] | None
    seconds: float
    stopped_early: bool = False
    interrupted: bool = False


def pick_device(name: str | None = None) -> torch.device:
    """CUDA when present (or asked for), then Apple's MPS, else the CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ImgrecError(f"--device {name}: no CUDA GPU is available", "use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _say(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def _contract_for(name: str, ds: Dataset, image_size: int, invert: str | None) -> Preprocess:
    """The preprocessing a new model trains with, recorded in its bundle."""
    if name.startswith("efficientnet_lite"):
        from ..models.pretrained import lite_preprocess

        return lite_preprocess(name, image_size)
    if ds.channels == 1:
        mean, std = (0.5,), (0.5,)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    # MNIST-style (light on dark, greyscale) models invert dark-on-light photos by default.
    default_invert = "auto" if ds.channels == 1 and ds.in_memory else "no"
    return Preprocess(input_size=image_size, channels=ds.channels, resize="squash",
                      interpolation="bilinear", mean=mean, std=std,
                      invert=invert or default_invert)


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ImgrecError(f"unknown optimizer {name!r}", f"choose one of {', '.join(OPTIMIZERS)}")


def _one_cycle(opt, lr: float | list[float], steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle over `steps` optimizer steps. Warm-up is a quarter of the run but at least
    1.5 steps: OneCycleLR divides by zero when its warm-up phase ends on step 0 (<= 4 steps)."""
    total = max(2, steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                               pct_start=max(0.25, 1.5 / total))


def _class_weights(labels: np.ndarray, n: int, mode: str, device) -> torch.Tensor | None:
    """Balanced weights when the largest class is over 1.5x the smallest (or when asked)."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    if mode == "none" or counts.min() == 0:
        return None
    if mode == "auto" and counts.max() / counts.min() < 1.5:
        return None
    w = counts.sum() / (n * counts)
    return torch.tensor(w, dtype=torch.float32, device=device)


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs is not None and cfg.epochs < 1, "--epochs must be at least 1"),
        (cfg.batch_size is not None and cfg.batch_size < 1, "--batch-size must be at least 1"),
        (cfg.image_size is not None and not 8 <= cfg.image_size <= 1024,
         "--image-size must be between 8 and 1024"),
        (cfg.lr is not None and not 0 < cfg.lr < 10, "--lr must be a positive number below 10"),
        (cfg.optimizer is not None and cfg.optimizer not in OPTIMIZERS,
         f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 0.9,
         "--val-fraction must be in [0, 0.9)"),
        (cfg.label_smoothing is not None and not 0 <= cfg.label_smoothing < 1,
         "--label-smoothing must be in [0, 1)"),
        (cfg.class_weights not in ("auto", "balanced", "none"),
         "--class-weights must be auto, balanced or none"),
        (cfg.invert not in (None, "auto", "yes", "no"), "--invert must be auto, yes or no"),
    ]
    for bad, message in checks:
        if bad:
            raise ImgrecError(message)
    Augment.parse(cfg.augment)  # a bad --augment fails before the data is loaded


class Trainer:
    """One training run. Construct, then call run()."""

    def __init__(self, cfg: TrainConfig):
        _validate(cfg)
        from .transfer import check_mode, setup_transfer

        check_mode(cfg)
        self.cfg = cfg
        seed_everything(cfg.seed)
        # a bare built-in name, or a path to CIFAR-10's binary files, gets its dataset's recipe
        key = builtin_key(cfg.data) or cfg.data.lower()
        self.recipe = r = recipe_for(key)
        pick = lambda name: getattr(cfg, name) if getattr(cfg, name) is not None else r.get(name)  # noqa: E731
        self.val_fraction, self.test_fraction = pick("val_fraction"), pick("test_fraction")
        self.ds = load_dataset(cfg.data, cfg.data_dir, val_fraction=self.val_fraction,
                               test_fraction=self.test_fraction, seed=cfg.seed)
        if key not in BUILTIN_RECIPES:  # folders, CSVs: by how the data is held
            self.recipe = r = recipe_for("memory" if self.ds.in_memory else "folder")
        self.model_name = resolve_model_name(cfg.model or r["model"])
        self.model_args = dict(cfg.model_args or (r.get("model_args", {}) if not cfg.model else {}))
        default_size = MODELS[self.model_name].default_size if self.model_name in MODELS else 224
        if self.model_name.startswith("efficientnet_lite"):
            default_size = None
        self.image_size = cfg.image_size or (self.ds.native_size if self.ds.in_memory else None) \
            or default_size or 224
        self.epochs = pick("epochs")
        self.batch_size = pick("batch_size")
        self.lr = pick("lr")
        self.optimizer_name = pick("optimizer")
        self.weight_decay = pick("weight_decay")
        self.label_smoothing = pick("label_smoothing")
        self.patience = pick("patience")
        self.augment = Augment.parse(pick("augment"))
        self.device = pick_device(cfg.device)
        self.out = Path(cfg.out or Path("runs") / f"{self.ds.name}-{self.model_name}")
        self.contract = _contract_for(self.model_name, self.ds, self.image_size, pick("invert"))
        tta = pick("tta") or "none"
        if tta not in ("none", "flip"):
            raise ImgrecError(f"--tta must be none or flip, not {tta!r}")
        if tta == "flip":
            self.contract = self.contract.replace(tta=["flip"])
        if r.get("fit"):  # how custom images are framed like the dataset's (recipes.py)
            self.contract = self.contract.replace(fit=r["fit"])
        setup_transfer(self)  # sets self.mode; transfer modes: backbone, contract, defaults

    # ------------------------------------------------------------------------------------
    def _build(self) -> torch.nn.Module:
        if self.mode == "finetune":  # the backbone + a head warmed up on cached features
            from .transfer import prepare_finetune

            self.transfer = prepare_finetune(self)
            self.arch = self.transfer.arch
            return self.transfer.model
        args = {"in_channels": self.ds.channels, "num_classes": len(self.ds.classes),
                "image_size": self.image_size, **self.model_args}
        model = build_model(self.model_name, **args)
        self.arch = {"name": self.model_name, "args": args}
        return model

    def run(self) -> TrainResult:
        if self.mode == "features":
            from .transfer import run_features

            return run_features(self)
        cfg, ds = self.cfg, self.ds
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        _say(cfg, f"data    {ds.describe()}")
        model = self._build().to(self.device)
        channels_last = self.device.type != "mps"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        n_params = sum(p.numel() for p in model.parameters())
        _say(cfg, f"model   {self.model_name} ({n_params / 1e6:.2f}M parameters), input "
                  f"{self.image_size}px x{ds.channels}, device {self.device}")
        _say(cfg, f"recipe  {self.epochs} epochs, batch {self.batch_size}, {self.optimizer_name} "
                  f"lr {self.lr:g} one-cycle, label smoothing {self.label_smoothing:g}, "
                  f"augment {self.augment.describe()}")

        train = Batches(ds.splits["train"], self.contract, self.batch_size, True, self.device,
                        cfg.seed, cfg.workers)
        val = (Batches(ds.splits["val"], self.contract, max(256, self.batch_size), False,
                       self.device, cfg.seed, cfg.workers) if "val" in ds.splits else None)
        params = (self.transfer.param_groups(model, self.lr, self.weight_decay)
                  if self.transfer is not None else model.parameters())
        opt = _optimizer(self.optimizer_name, params, self.lr, self.weight_decay)
        max_lr = [g["lr"] for g in opt.param_groups]  # per group: discriminative rates
        sched = _one_cycle(opt, max_lr if len(max_lr) > 1 else self.lr,
                           self.epochs * len(train))
        weights = _class_weights(ds.splits["train"].labels, len(ds.classes), cfg.class_weights,
                                 self.device)
        if weights is not None:
            _say(cfg, "classes are imbalanced: the loss weighs them inversely to their counts")
        amp = self.device.type == "cuda"
        amp_dtype = (torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

        history: list[dict] = []
        skipped: dict[str, str] = {}
        best = {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": None}
        if self.transfer is not None and val is not None:
            best = self.transfer.initial_best(model)  # the warmed-up network is epoch 0
        start_epoch = 1
        ckpt_path = self.out / CHECKPOINT
        if cfg.resume:
            start_epoch, history, best, skipped = self._resume(ckpt_path, model, opt, sched)
        tb = TensorBoard(self.out) if cfg.tensorboard else None
        self._tb = tb
        stopped_early = interrupted = False
        bad_epochs = 0

        def on_term(signum, frame):  # a `kill` saves the work like Ctrl-C does
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, on_term)
        try:
            for epoch in range(start_epoch, self.epochs + 1):
                t_ep = time.time()
                tr_loss, tr_acc = self._train_epoch(model, train, opt, sched, scaler, amp,
                                                    amp_dtype, weights, epoch, skipped,
                                                    channels_last)
                row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": tr_loss,
                       "train_acc": tr_acc}
                if val is not None:
                    vl, va = self._evaluate(model, val, amp, amp_dtype, skipped, channels_last)
                    row.update(val_loss=vl, val_acc=va)
                row["seconds"] = round(time.time() - t_ep, 2)
                history.append(row)
                if tb:
                    tb.epoch(row)
                    if val is not None:
                        tb.confusion(getattr(self, "_val_confusion", None), ds.classes, epoch)
                score = (row.get("val_acc", tr_acc), -row.get("val_loss", tr_loss))
                if score > (best["acc"], -best["loss"]):
                    best = {"acc": score[0], "loss": -score[1], "epoch": epoch,
                            "state": copy.deepcopy(model.state_dict())}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                msg = f"epoch {epoch}/{self.epochs}  loss {tr_loss:.4f}  acc {tr_acc:.4f}"
                if val is not None:
                    msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
                _say(cfg, msg + f"  ({row['seconds']:.1f}s)")
                self._checkpoint(ckpt_path, model, opt, sched, epoch, history, best, skipped)
                if val is not None and self.patience and bad_epochs >= self.patience:
                    _say(cfg, f"early stop: no validation gain for {self.patience} epochs")
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            interrupted = True
            _say(cfg, "interrupted: saving the best model so far (resume with --resume)")
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if tb:
                tb.close()
        if best["state"] is not None and val is not None:
            model.load_state_dict(best["state"])  # restore-best
        if not history:
            raise ImgrecError("training stopped before the first epoch finished; nothing saved")
        bundle = self._save(model, history, best, skipped, time.time() - t0, stopped_early,
                            interrupted)
        test_metrics = None
        if not interrupted and "test" in ds.splits:
            from ..evaluation import evaluate_bundle

            report = evaluate_bundle(bundle, ds, "test", device=self.device)
            test_metrics = report.headline()
            skipped.update(report.skipped)  # bad files in the test split are reported too
            bundle.metrics = {"test": test_metrics}
            bundle.training["skipped_files"] = len(skipped)
            bundle.write_meta()
            _say(cfg, f"test    accuracy {report.accuracy:.4f} on {report.n} images")
        if skipped:  # a warning about the data, not progress: shown even with --quiet
            print(skipped_report(skipped), file=sys.stderr, flush=True)
        return TrainResult(bundle, history, skipped, test_metrics, time.time() - t0,
                           stopped_early, interrupted)

    # ------------------------------------------------------------------------------------
    def _prep(self, x: torch.Tensor, train: bool, channels_last: bool) -> torch.Tensor:
        x = x.float()
        if train:
            x = self.augment(x)
        x = self.contract.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _train_epoch(self, model, batches, opt, sched, scaler, amp, amp_dtype, weights, epoch,
                     skipped, channels_last) -> tuple[float, float]:
        from tqdm import tqdm

        model.train()
        if self.transfer is not None:
            self.transfer.train_mode(model)  # BatchNorm statistics frozen for small batches
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{self.epochs}", leave=False, unit="batch",
                   disable=self.cfg.quiet or None, dynamic_ncols=True)
        for step, (x, y, bad) in enumerate(bar):
            skipped.update(dict(bad))
            if x is None:
                sched.step() if sched.last_epoch < sched.total_steps - 1 else None
                continue
            tb = getattr(self, "_tb", None)
            if tb is not None and not tb.has_batch:  # one batch, as the model sees it
                cuda = [self.device.index or 0] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):  # same training with or without
                    tb.sample_batch(self.augment(x.float()), y, self.ds.classes, epoch)
            x = self._prep(x, True, channels_last)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weights,
                                       label_smoothing=self.label_smoothing)
            if not torch.isfinite(loss):
                raise ImgrecError(f"the loss became {loss.item()} at epoch {epoch}",
                                  "lower --lr (the run diverged)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if sched.last_epoch < sched.total_steps - 1:
                sched.step()
            n = len(y)
            total_loss += loss.detach() * n
            correct += (logits.argmax(1) == y).sum()
            seen += n
            if step % 20 == 0 and seen:
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}",
                                acc=f"{correct.item() / seen:.4f}")
        bar.close()
        if not seen:
            raise ImgrecError("no training image could be read", "run `imgrec doctor DATA`")
        return total_loss.item() / seen, correct.item() / seen

    @torch.no_grad()
    def _evaluate(self, model, batches, amp, amp_dtype, skipped, channels_last):
        model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        n = len(self.ds.classes)
        cm = torch.zeros(n * n, dtype=torch.long, device=self.device)  # for TensorBoard
        for x, y, bad in batches:
            skipped.update(dict(bad))
            if x is None:
                continue
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp):
                xin = self._prep(x, False, channels_last)
                logits = model(xin).float()
                if "flip" in self.contract.tta:  # the same TTA the Predictor applies
                    logits = (logits + model(xin.flip(-1)).float()) / 2
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            cm += torch.bincount(y * n + logits.argmax(1), minlength=n * n)
            seen += len(y)
        self._val_confusion = cm.view(n, n).cpu().numpy()
        return total_loss / max(seen, 1), correct / max(seen, 1)

    # ------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"data": self.ds.fingerprint(), "model": self.model_name,
                "model_args": self.model_args, "image_size": self.image_size,
                "batch_size": self.batch_size}  # not epochs: `--resume --epochs N` extends

    def _checkpoint(self, path, model, opt, sched, epoch, history, best, skipped) -> None:
        """Everything needed to resume, written atomically (a crash keeps the last one)."""
        import io

        state = {
            "fingerprint": self._fingerprint(), "epoch": epoch, "history": history,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "best_acc": best["acc"], "best_loss": best["loss"],
            "best_epoch": best["epoch"], "best_state": best["state"], "skipped": skipped,
            "rng": torch.get_rng_state(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    def _resume(self, path: Path, model, opt, sched):
        if not path.is_file():
            raise ImgrecError(f"--resume: no checkpoint at {path}",
                              "give the --out folder of the interrupted run")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise ImgrecError(f"--resume: {path} is unreadable ({e})",
                              "start again without --resume") from None
        if state.get("fingerprint") != self._fingerprint():
            raise ImgrecError(
                "--resume: the checkpoint was made with other data, model or settings",
                "repeat the original command with --resume, or train into another --out",
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        old_sched = state["scheduler"]
        if old_sched.get("total_steps") == sched.total_steps:
            sched.load_state_dict(old_sched)
        else:  # --epochs changed: the one-cycle schedule stretches to the new length
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = min(int(old_sched.get("last_epoch", 0)), sched.total_steps - 1)
                while sched.last_epoch < target:
                    sched.step()
        torch.set_rng_state(state["rng"].cpu())
        best = {"acc": state["best_acc"], "loss": state["best_loss"],
                "epoch": state["best_epoch"], "state": state["best_state"]}
        _say(self.cfg, f"resume  from epoch {state['epoch']} of {self.epochs}")
        return state["epoch"] + 1, state["history"], best, state.get("skipped", {})

    def _save(self, model, history, best, skipped, seconds, stopped_early, interrupted) -> Bundle:
        from .. import images  # noqa: F401  (keeps the decoder's limits in the record)

        training = {
            "data": self.cfg.data, "dataset": self.ds.name, "data_fingerprint":
            self.ds.fingerprint(), "splits": {k: len(v) for k, v in self.ds.splits.items()},
            "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
            "mode": self.mode, "epochs_run": len(history), "epochs": self.epochs,
            "best_epoch": best["epoch"], "batch_size": self.batch_size, "lr": self.lr,
            "optimizer": self.optimizer_name, "label_smoothing": self.label_smoothing,
            "augment": self.augment.describe(), "seed": self.cfg.seed,
            "seconds": round(seconds, 1), "device": str(self.device),
            "stopped_early": stopped_early, "interrupted": interrupted,
            "skipped_files": len(skipped), "imgrec_version": __version__,
            "torch_version": torch.__version__,
            **(self.transfer.record if self.transfer is not None else {}),
        }
        bundle = Bundle(self.out, self.arch, list(self.ds.classes), self.contract,
                        training=training)
        save_bundle(bundle, model)
        write_history(self.out / "history.csv", history)
        plot_curves(self.out / "curves.png", history,
                    f"{self.model_name} on {self.ds.name}")
        (self.out / "config.json").write_text(
            __import__("json").dumps(asdict(self.cfg), indent=2) + "\n")
        return bundle


def train(data: str, **options) -> TrainResult:
    """Python API: `imgrec.train("mnist", epochs=3)` -> TrainResult with .bundle."""
    return Trainer(TrainConfig(data=data, **options)).run()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
