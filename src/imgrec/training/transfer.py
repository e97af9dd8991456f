"""Transfer learning from a pretrained backbone: `--mode features` and `--mode finetune`.

features: the backbone stays frozen; each image's pooled features come from the on-disk cache
(training/features.py) or are computed once; a linear or small MLP head trains on the feature
tensor in seconds, with early stopping on validation. The bundle holds the full network
(backbone + the trained head), so predict/evaluate/serve/export need no training code.

finetune: the same head warm-up, then the whole network trains in Trainer's loop with
discriminative learning rates (timm's layer-wise decay: earlier blocks learn slower),
BatchNorm statistics frozen for small batches, early stopping and restore-best (the warmed-up
network counts as epoch 0, so fine-tuning never ends worse on validation than the warm-up).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImgrecError, skipped_report
from ..models.pretrained import OFFLINE_WEIGHTS, Backbone, make_head, resolve_backbone
from .features import Extractor

if TYPE_CHECKING:
    from .loop import TrainConfig, Trainer, TrainResult

MODES = ("auto", "scratch", "features", "finetune")
HEADS = ("linear", "mlp")
MLP_HIDDEN, MLP_DROPOUT = 256, 0.5  # the workshops' cats-vs-dogs head: Dense 256, dropout
LAYER_DECAY = 0.85  # lr scale per block going down from the head (stem gets ~0.06 on Lite0)
FREEZE_BN_BELOW = 64  # batch sizes under this keep BatchNorm's pretrained statistics

#: Defaults where the user gave none. features: the head's epochs/lr/batch on the feature
#: tensor; finetune: the whole network's (after the same head warm-up).
FEATURES_DEFAULTS = {"epochs": 100, "lr": 1e-3, "batch_size": 256, "patience": 15,
                     "weight_decay": 1e-2, "label_smoothing": 0.1, "augment": "standard"}
FINETUNE_DEFAULTS = {"epochs": 4, "lr": 2e-4, "batch_size": 32, "patience": 2,
                     "weight_decay": 1e-2, "label_smoothing": 0.1, "augment": "light"}


def _say(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def check_mode(cfg: TrainConfig) -> None:
    """Reject bad transfer options before any data is read."""
    if (cfg.mode or "auto") not in MODES:
        raise ImgrecError(f"unknown --mode {cfg.mode!r}", f"choose one of {', '.join(MODES)}")
    if cfg.head not in HEADS:
        raise ImgrecError(f"unknown --head {cfg.head!r}", "use --head linear or --head mlp")
    if cfg.augment_views < 0 or cfg.augment_views > 64:
        raise ImgrecError("--augment-views must be between 0 and 64")
    if cfg.mode == "scratch" and (cfg.pretrained or cfg.weights):
        raise ImgrecError("--mode scratch trains from random weights; --pretrained/--weights "
                          "need a transfer mode", "use --mode features or --mode finetune")
    if cfg.mode in ("features", "finetune") and not cfg.model:
        raise ImgrecError(f"--mode {cfg.mode} needs a pretrained backbone",
                          f"add --model {next(iter(OFFLINE_WEIGHTS))} (offline ImageNet weights)")


def setup_transfer(t: Trainer) -> None:
    """Resolve --mode (auto: a pretrained backbone on image files -> features, else scratch),
    the backbone and its weights (clear errors up front), its preprocessing contract and the
    mode's defaults. Called at the end of Trainer.__init__."""
    cfg = t.cfg
    t.transfer = None
    t.backbone = None
    files = not t.ds.in_memory and t.ds.channels == 3
    pretrained = bool(cfg.pretrained or cfg.weights or t.model_name in OFFLINE_WEIGHTS)
    mode = cfg.mode or "auto"
    if mode == "auto":
        mode = "features" if pretrained and files and cfg.model else "scratch"
    t.mode = mode
    if mode == "scratch":
        return
    if not files:
        raise ImgrecError(f"--mode {mode} needs colour image files (a folder or a CSV of paths)",
                          "built-in array datasets train with --mode scratch")
    t.backbone = resolve_backbone(t.model_name, cfg.pretrained, cfg.weights, cfg.image_size)
    # the backbone's pixels; the data's own framing of custom images (MNIST's digit fit,
    # invert) and --tta are kept
    t.contract = t.backbone.contract.replace(tta=list(t.contract.tta), fit=t.contract.fit,
                                             invert=t.contract.invert)
    t.image_size = t.contract.input_size
    defaults = FEATURES_DEFAULTS if mode == "features" else FINETUNE_DEFAULTS
    for name in ("epochs", "lr", "batch_size", "patience", "weight_decay", "label_smoothing"):
        if getattr(cfg, name) is None:
            setattr(t, name, defaults[name])
    if cfg.augment is None:
        from ..augment import Augment

        t.augment = Augment.parse(defaults["augment"])
    if cfg.augment_views and not t.augment.active:
        raise ImgrecError("--augment-views needs an augmentation to draw the views from",
                          "drop --augment none, or give e.g. --augment standard")
    if cfg.optimizer is None:
        t.optimizer_name = "adamw"


# -- the head on cached features ----------------------------------------------------------
@dataclass
class HeadResult:
    head: nn.Module  # takes raw (unstandardised) features
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    val_acc: float | None
    val_loss: float | None


def _fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> nn.Module:
    """The head trained on (x - mean) / std; fold that into its first Linear so it takes the
    backbone's raw features (the bundle's network has no extra layer)."""
    first = head if isinstance(head, nn.Linear) else head[0]
    with torch.no_grad():
        w = first.weight / std
        first.bias.sub_((w * mean).sum(1))
        first.weight.copy_(w)
    return head


def train_head(*args, **kwargs) -> HeadResult:
    """AdamW on the feature tensor (standardised per dimension), cosine schedule, early stop
    on validation with restore-best. Seconds on a CPU: the backbone never runs here. One
    thread: for these small matrices, thread start-up and contention cost more than they
    bring (3-5x slower with two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_head(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None,
                y_val: np.ndarray | None, num_classes: int, kind: str, epochs: int, lr: float,
                batch_size: int, weight_decay: float, label_smoothing: float, patience: int,
                seed: int, class_weights: torch.Tensor | None = None,
                quiet: bool = True) -> HeadResult:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt = torch.from_numpy(x_train).float()
    yt = torch.from_numpy(y_train).long()
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-4)
    xt = (xt - mean) / std
    xv = (torch.from_numpy(x_val).float() - mean) / std if x_val is not None else None
    yv = torch.from_numpy(y_val).long() if y_val is not None else None
    head = make_head(kind, xt.shape[1], num_classes, MLP_HIDDEN, MLP_DROPOUT)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    history: list[dict] = []
    best = {"score": (-1.0, -math.inf), "epoch": 0, "state": None, "acc": None, "loss": None}
    bad = 0
    stopped = False
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        head.train()
        order = torch.randperm(len(xt), generator=gen)
        total, correct = 0.0, 0
        for s in range(0, len(xt), batch_size):
            idx = order[s : s + batch_size]
            logits = head(xt[idx])
            loss = F.cross_entropy(logits, yt[idx], weight=class_weights,
                                   label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": total / len(xt),
               "train_acc": correct / len(xt)}
        if xv is not None and len(xv):
            head.eval()
            with torch.no_grad():
                lv = head(xv)
            row["val_loss"] = F.cross_entropy(lv, yv).item()
            row["val_acc"] = float((lv.argmax(1) == yv).float().mean())
        row["seconds"] = round(time.time() - t0, 3)
        history.append(row)
        score = (row.get("val_acc", row["train_acc"]), -row.get("val_loss", row["train_loss"]))
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(head.state_dict()),
                    "acc": row.get("val_acc"), "loss": row.get("val_loss")}
            bad = 0
        else:
            bad += 1
        if not quiet and (epoch % 10 == 0 or epoch == 1):
            msg = f"head epoch {epoch}/{epochs}  loss {row['train_loss']:.4f}  " \
                  f"acc {row['train_acc']:.4f}"
            if "val_acc" in row:
                msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
            print(msg, file=sys.stderr, flush=True)
        if xv is not None and patience and bad >= patience:
            stopped = True
            break
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    head.eval()
    return HeadResult(_fold_standardisation(head, mean, std), history, best["epoch"], stopped,
                      best["acc"], best["loss"])


# -- the bundle's network: backbone + trained head ---------------------------------------
def compose(backbone: Backbone, backbone_model: nn.Module, head: nn.Module, kind: str,
            num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The full network as a registry architecture, so downstream loads it with no training
    code: a linear head goes into the timm model's own classifier slot; an MLP head makes a
    'transfer' network (backbone + head)."""
    from ..models.registry import build_model

    size = backbone.contract.input_size
    state = backbone_model.state_dict()
    if kind == "linear":
        args = {"in_channels": 3, "num_classes": num_classes, "image_size": size}
        model = build_model(backbone.name, **args)
        clf = model.get_classifier()
        if isinstance(clf, nn.Linear) and clf.in_features == head.in_features:
            missing, unexpected = model.load_state_dict(state, strict=False)
            slot = {k for k in model.state_dict() if k not in state}
            if not unexpected and set(missing) == slot:
                clf.load_state_dict(head.state_dict())
                return model.eval(), {"name": backbone.name, "args": args}
    args = {"backbone": backbone.name, "num_classes": num_classes, "in_channels": 3,
            "head": kind, "hidden": MLP_HIDDEN, "dropout": MLP_DROPOUT, "image_size": size}
    model = build_model("transfer", **args)
    model.backbone.load_state_dict(state)
    model.head.load_state_dict(head.state_dict())
    return model.eval(), {"name": "transfer", "args": args}


def _head_logits(head: nn.Module, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(feats).float()).numpy()


@dataclass
class Prepared:
    """A backbone's features for every split and a head trained on them."""

    extractor: Extractor
    feats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # split -> (x, y, paths)
    head: HeadResult
    skipped: dict[str, str]
    extract_seconds: float


def _prepare(t: Trainer, head_epochs: int, head_lr: float, head_batch: int,
             head_patience: int, head_wd: float, label_smoothing: float) -> Prepared:
    """Features for all splits (cache first), then the head."""
    from .loop import _class_weights

    cfg, ds = t.cfg, t.ds
    device = t.device if t.device.type == "cuda" else None
    ex = Extractor(t.backbone, device=device, quiet=cfg.quiet)
    t_ex = time.time()
    feats, skipped = {}, {}
    views = cfg.augment_views
    spec = t.augment.describe()
    for name, split in ds.splits.items():
        k = views if name == "train" else 0
        x, good, bad = ex.features(split.paths, views=k, augment=spec, seed=cfg.seed,
                                   desc=f"features {name}")
        skipped.update(bad)
        paths = np.array(split.paths, dtype=object)[good]
        feats[name] = (x[good], split.labels[good], paths)
    extract_seconds = time.time() - t_ex
    s = ex.stats
    _say(cfg, f"cache   {s['cached']} feature vectors reused, {s['computed']} computed "
              f"({extract_seconds:.1f}s)" + (f", {s['corrupted']} damaged entries recomputed"
                                             if s["corrupted"] else ""))
    x_tr, y_tr, _ = feats["train"]
    if not len(x_tr):
        raise ImgrecError("no training image could be read", "run `imgrec doctor DATA`")
    v = x_tr.shape[1]
    x_train, y_train = x_tr.reshape(-1, x_tr.shape[-1]), np.repeat(y_tr, v)
    x_val = y_val = None
    if "val" in feats and len(feats["val"][0]):
        x_val, y_val = feats["val"][0][:, 0], feats["val"][1]
    weights = _class_weights(y_tr, len(ds.classes), cfg.class_weights, "cpu")
    head = train_head(x_train, y_train, x_val, y_val, len(ds.classes), cfg.head, head_epochs,
                      head_lr, head_batch, head_wd, label_smoothing, head_patience, cfg.seed,
                      weights, quiet=cfg.quiet)
    msg = f"head    {cfg.head} on {len(x_train)} feature vectors ({v} view(s) per image): " \
          f"best epoch {head.best_epoch}/{len(head.history)}"
    if head.val_acc is not None:
        msg += f", val_acc {head.val_acc:.4f}"
    _say(cfg, msg)
    return Prepared(ex, feats, head, skipped, extract_seconds)


def _record(t: Trainer, prep: Prepared) -> dict[str, Any]:
    b = t.backbone
    return {"backbone": b.name, "weights_source": b.source, "weights": b.identity,
            "head": t.cfg.head, "augment_views": t.cfg.augment_views,
            "feature_dim": prep.extractor.dim, "feature_engine": getattr(
                prep.extractor._engine, "name", "cache"),
            "feature_cache": str(prep.extractor.cache.folder),
            "features_cached": prep.extractor.stats["cached"],
            "features_computed": prep.extractor.stats["computed"],
            "cache_entries_recomputed": prep.extractor.stats["corrupted"],
            "extract_seconds": round(prep.extract_seconds, 1)}


def run_features(t: Trainer) -> TrainResult:
    """--mode features end to end: features (cached), head, bundle, test metrics."""
    from .. import __version__
    from ..bundle import Bundle
    from ..evaluation import EvalReport
    from ..history import plot_curves, write_history
    from ..network import save_bundle
    from ..predict import softmax
    from .loop import TrainResult
    from .record import TensorBoard

    cfg, ds = t.cfg, t.ds
    t0 = time.time()
    t.out.mkdir(parents=True, exist_ok=True)
    _say(cfg, f"data    {ds.describe()}")
    _say(cfg, f"model   {t.model_name} frozen ({t.backbone.source} weights), input "
              f"{t.image_size}px; {cfg.head} head, {t.epochs} epochs max, lr {t.lr:g}")
    prep = _prepare(t, t.epochs, t.lr, t.batch_size, t.patience, t.weight_decay,
                    t.label_smoothing)
    model, arch = compose(t.backbone, prep.extractor.model(), prep.head.head, cfg.head,
                          len(ds.classes))
    history = prep.head.history
    training = {
        "data": cfg.data, "dataset": ds.name, "data_fingerprint": ds.fingerprint(),
        "splits": {k: len(v) for k, v in ds.splits.items()}, "val_fraction": t.val_fraction,
        "test_fraction": t.test_fraction, "mode": "features", "epochs_run": len(history),
        "epochs": t.epochs, "best_epoch": prep.head.best_epoch, "batch_size": t.batch_size,
        "lr": t.lr, "optimizer": "adamw", "label_smoothing": t.label_smoothing,
        "augment": t.augment.describe() if cfg.augment_views else "none", "seed": cfg.seed,
        "seconds": round(time.time() - t0, 1), "device": str(t.device),
        "stopped_early": prep.head.stopped_early, "interrupted": False,
        "skipped_files": len(prep.skipped), "imgrec_version": __version__,
        "torch_version": torch.__version__, **_record(t, prep),
    }
    bundle = Bundle(t.out, arch, list(ds.classes), t.contract, training=training)
    save_bundle(bundle, model)
    write_history(t.out / "history.csv", history)
    plot_curves(t.out / "curves.png", history, f"{t.model_name} features on {ds.name}")
    if cfg.tensorboard:
        tb = TensorBoard(t.out)
        for row in history:
            tb.epoch(row)
        tb.close()
    test_metrics = None
    if "test" in prep.feats and len(prep.feats["test"][0]) and t.contract.tta:
        from ..evaluation import evaluate_bundle  # test-time augmentation: the real path

        report = evaluate_bundle(bundle, ds, "test", device=t.device)
        test_metrics = report.headline()
        bundle.metrics = {"test": test_metrics}
        bundle.write_meta()
        _say(cfg, f"test    accuracy {report.accuracy:.4f} on {report.n} images (flip TTA)")
    elif "test" in prep.feats and len(prep.feats["test"][0]):
        # The bundle's network on the test images = head(backbone features); the features are
        # the cached ones (ONNX export checked against PyTorch), so a warm run skips the backbone.
        x, y, paths = prep.feats["test"]
        probs = softmax(_head_logits(prep.head.head, x[:, 0]))
        test_paths = set(ds.splits["test"].paths)
        test_skipped = {p: r for p, r in prep.skipped.items() if p in test_paths}
        report = EvalReport(list(ds.classes), y, probs, [str(p) for p in paths], "test",
                            ds.name, test_skipped)
        test_metrics = report.headline()
        bundle.metrics = {"test": test_metrics}
        bundle.write_meta()
        _say(cfg, f"test    accuracy {report.accuracy:.4f} on {report.n} images")
    if prep.skipped:  # a warning about the data, not progress: shown even with --quiet
        print(skipped_report(prep.skipped), file=sys.stderr, flush=True)
    import json
    from dataclasses import asdict

    (t.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return TrainResult(bundle, history, prep.skipped, test_metrics, time.time() - t0,
                       prep.head.stopped_early, False)


# -- finetune ------------------------------------------------------------------------------
@dataclass
class FinetunePlan:
    """What Trainer's loop needs to fine-tune a warmed-up network."""

    model: nn.Module
    arch: dict[str, Any]
    freeze_bn: bool
    warmup_val_acc: float | None
    warmup_val_loss: float | None
    record: dict[str, Any]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Discriminative learning rates: timm's layer-wise decay over the backbone's blocks
        (the head at lr, each block below at LAYER_DECAY times the one above)."""
        from timm.optim import param_groups_layer_decay

        body = model.backbone if hasattr(model, "backbone") else model
        groups = param_groups_layer_decay(body, weight_decay=weight_decay,
                                          layer_decay=LAYER_DECAY)
        if body is not model:
            groups.append({"params": list(model.head.parameters()), "lr_scale": 1.0,
                           "weight_decay": weight_decay})
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        return groups

    def train_mode(self, model: nn.Module) -> None:
        """Train mode, but BatchNorm keeps its pretrained statistics for small batches (a
        batch of 16-32 photos estimates them badly and wrecks the features)."""
        if self.freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def initial_best(self, model: nn.Module) -> dict:
        """The warmed-up network as epoch 0 of restore-best."""
        if self.warmup_val_acc is None:
            return {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": None}
        return {"acc": self.warmup_val_acc, "loss": self.warmup_val_loss, "epoch": 0,
                "state": copy.deepcopy(model.state_dict())}


def prepare_finetune(t: Trainer) -> FinetunePlan:
    """Head warm-up on the cached features, then the full network for Trainer's loop."""
    cfg = t.cfg
    d = FEATURES_DEFAULTS
    _say(cfg, f"warm-up {cfg.head} head on frozen {t.model_name} features")
    prep = _prepare(t, d["epochs"], d["lr"], d["batch_size"], d["patience"], d["weight_decay"],
                    d["label_smoothing"])
    model, arch = compose(t.backbone, prep.extractor.model(), prep.head.head, cfg.head,
                          len(t.ds.classes))
    freeze = t.batch_size < FREEZE_BN_BELOW
    _say(cfg, f"unfreeze all layers: layer-wise lr decay {LAYER_DECAY}, BatchNorm statistics "
              + ("frozen" if freeze else "updated") + f" (batch {t.batch_size})")
    record = {**_record(t, prep), "warmup_best_epoch": prep.head.best_epoch,
              "warmup_val_acc": prep.head.val_acc, "layer_decay": LAYER_DECAY,
              "bn_frozen": freeze}
    return FinetunePlan(model, arch, freeze, prep.head.val_acc, prep.head.val_loss, record)
