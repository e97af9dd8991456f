"""Transfer learning's building blocks: a pretrained backbone's features for every split
(cached: training/features.py), a head trained on them, and the bundle's network composed
from the two. The runners (training/runners.py) put them together:

features: the backbone stays frozen; a linear or small MLP head trains on the feature tensor
in seconds, with early stopping on validation. The bundle holds the full network (backbone +
head), so predict/evaluate/serve/export need no training code.

finetune: the same head warm-up, then the whole network trains in the epoch loop with
discriminative learning rates (timm's layer-wise decay: earlier blocks learn slower) and
BatchNorm statistics frozen for small batches; the warmed-up network counts as epoch 0 of
restore-best, so fine-tuning never ends worse on validation than the warm-up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImgrecError
from ..models.pretrained import Backbone, make_head
from . import distributed, optimizers
from .callbacks import CallbackList, EarlyStopping, RunState
from .engine import (
    balanced_cross_entropy,
    check_every_class_taught,
    class_weights,
    weights_note,
)
from .features import Extractor
from .plan import RunPlan
from .recipes import HEAD_DROPOUT, LAYER_DECAY, TRANSFER_DEFAULTS

MLP_HIDDEN = 256  # the workshops' cats-vs-dogs head: Dense 256, dropout (HEAD_DROPOUT)
FREEZE_BN_BELOW = 64  # batch sizes under this keep BatchNorm's pretrained statistics


# -- features for every split -------------------------------------------------------------
@dataclass
class FeatureSet:
    """A backbone's features for every split: split -> (x, y, paths), x: N x views x D."""

    extractor: Extractor
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    skipped: dict[str, str]
    seconds: float

    def record(self) -> dict[str, Any]:
        """What imgrec.json records about the features."""
        ex = self.extractor
        return {"feature_dim": ex.dim, "feature_engine": getattr(ex._engine, "name", "cache"),
                "feature_cache": str(ex.cache.folder), "features_cached": ex.stats["cached"],
                "features_computed": ex.stats["computed"],
                "cache_entries_recomputed": ex.stats["corrupted"],
                "extract_seconds": round(self.seconds, 1),
                "extract_images_per_s": round(ex.timing["images"] / ex.timing["seconds"], 1)
                if ex.timing["images"] else None,
                "extract_lanes": (len(ex._lanes or [None]) if ex.timing["images"] else None)}


def extract_features(plan: RunPlan, callbacks: CallbackList, state: RunState) -> FeatureSet:
    """Every split's features, cache first; augmented views for training with
    --augment-views. Under torchrun each rank embeds its share into the cache first, then
    every rank reads all of it from there."""
    ex = _extractor(plan)
    t0 = time.time()
    totals = _extract_shards(ex, plan) if plan.world.active else None
    splits, skipped = {}, {}
    total, before = sum(len(s.paths) for s in plan.data.splits.values()), 0
    for name, split in plan.data.splits.items():
        views = plan.cfg.augment_views if name == "train" else 0

        def progress(done: int, _: int, before: int = before) -> None:
            callbacks.on_extract(state, before + done, total)

        x, good, bad = ex.features(split.paths, views=views, augment=plan.augment.describe(),
                                   seed=plan.cfg.seed, desc=f"features {name}",
                                   progress=progress)
        before += len(split.paths)
        skipped.update(bad)
        splits[name] = (x[good], split.labels[good], np.array(split.paths, dtype=object)[good])
    fs = FeatureSet(ex, splits, skipped, time.time() - t0)
    if totals is not None:  # what all ranks computed and reused, not this rank's merge
        ex.stats["computed"], ex.stats["cached"] = totals
    s = ex.stats
    note = f"cache   {s['cached']} feature vectors reused, {s['computed']} computed " \
           f"({fs.seconds:.1f}s)"
    if s["corrupted"]:
        note += f", {s['corrupted']} damaged entries recomputed"
    callbacks.on_note(state, note)
    if not len(splits["train"][0]):
        raise ImgrecError("no training image could be read", "run `imgrec doctor DATA`")
    check_every_class_taught(plan.data.classes, splits["train"][1])
    return fs


def _extractor(plan: RunPlan) -> Extractor:
    """The backbone's extractor; under torchrun rank 0 makes it first (its record and ONNX
    export land in the cache once) while the others wait, then they open the same."""
    device = plan.device if plan.device.type == "cuda" else None
    quiet = plan.cfg.quiet or not plan.world.main
    ex = None
    if plan.world.main:
        ex = Extractor(plan.backbone, device=device, quiet=quiet)
        ex.engine()
    distributed.barrier(plan.world)
    return ex or Extractor(plan.backbone, device=device, quiet=quiet)


def _extract_shards(ex: Extractor, plan: RunPlan) -> tuple[int, int]:
    """This rank's share (every world-th file of each split) embedded into the shared
    feature cache; returns the (computed, reused) counts of all ranks. The reduction is also
    the barrier after which every rank's entries are in the cache. Without a cache that all
    nodes share, a rank computes the missing rest itself (correct, slower)."""
    w = plan.world
    for name, split in plan.data.splits.items():
        views = plan.cfg.augment_views if name == "train" else 0
        ex.features(split.paths[w.rank :: w.size], views=views,
                    augment=plan.augment.describe(), seed=plan.cfg.seed, desc=f"features {name}")
    totals = distributed.all_sum(w, [ex.stats["computed"], ex.stats["cached"]])
    ex.stats.update(computed=0, cached=0)
    return int(totals[0]), int(totals[1])


# -- the head on cached features ----------------------------------------------------------
@dataclass
class HeadResult:
    head: nn.Module  # takes raw (unstandardised) features
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    val_acc: float | None
    val_loss: float | None


@dataclass(frozen=True)
class HeadSettings:
    kind: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    label_smoothing: float
    patience: int

    @classmethod
    def of(cls, plan: RunPlan, warmup: bool) -> HeadSettings:
        """features mode: the plan's own settings; the finetune warm-up: features defaults."""
        if warmup:
            d = TRANSFER_DEFAULTS["features"]
            return cls(plan.cfg.head, d["epochs"], d["lr"], d["batch_size"], d["weight_decay"],
                       d["label_smoothing"], d["patience"])
        return cls(plan.cfg.head, plan.epochs, plan.lr, plan.global_batch, plan.weight_decay,
                   plan.label_smoothing, plan.patience)


#: a feature's standard deviation is taken as at least this fraction of the median one's
STD_FLOOR = 0.1


def robust_std(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviations of training features, floored at STD_FLOOR of the
    median: a dimension (nearly) constant over the training images (a channel dead at 64
    px, 40 photos) had its deviation clamped to 1e-4, so a validation image with any value
    there became thousands of deviations out, and the validation loss 15.7 against 0.6."""
    std = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
    floor = max(STD_FLOOR * float(std.median()), 1e-4)
    return std.clamp_min(floor)


def _fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> nn.Module:
    """The head trained on (x - mean) / std; fold that into its first Linear so it takes the
    backbone's raw features (the bundle's network has no extra layer)."""
    first = head if isinstance(head, nn.Linear) else head[0]
    with torch.no_grad():
        w = first.weight / std
        first.bias.sub_((w * mean).sum(1))
        first.weight.copy_(w)
    return head


def train_head(fs: FeatureSet, plan: RunPlan, settings: HeadSettings, callbacks: CallbackList,
               state: RunState) -> HeadResult:
    """AdamW on the feature tensor (standardised per dimension), cosine schedule, early stop
    on validation with restore-best. Seconds on a CPU: the backbone never runs here. One
    thread: for these small matrices, thread start-up and contention cost more than they
    bring (3-5x slower with two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state.stage, state.epochs, state.history = "head", settings.epochs, []
    try:
        trainer = _HeadTrainer(fs, plan, settings)
        if trainer.weights is not None and plan.mode == "features":  # finetune says it later
            callbacks.on_note(state, weights_note(plan.cfg.class_weights))
        return trainer.run(callbacks, state)
    finally:
        torch.set_num_threads(threads)
        state.stage, state.stop_training, state.stop_reason = "train", False, None


class _HeadTrainer:
    def __init__(self, fs: FeatureSet, plan: RunPlan, s: HeadSettings):
        torch.manual_seed(plan.cfg.seed)
        self.gen = torch.Generator().manual_seed(plan.cfg.seed)
        self.s = s
        x_tr, y_tr, _ = fs.splits["train"]
        views = x_tr.shape[1]
        xt = torch.from_numpy(x_tr.reshape(-1, x_tr.shape[-1])).float()
        self.yt = torch.from_numpy(np.repeat(y_tr, views)).long()
        self.mean, self.std = xt.mean(0), robust_std(xt)
        self.xt = (xt - self.mean) / self.std
        self.xv = self.yv = None
        if "val" in fs.splits and len(fs.splits["val"][0]):
            self.xv = (torch.from_numpy(fs.splits["val"][0][:, 0]).float() - self.mean) / self.std
            self.yv = torch.from_numpy(fs.splits["val"][1]).long()
        self.weights = class_weights(y_tr, len(plan.data.classes), plan.cfg.class_weights, "cpu")
        self.head = make_head(s.kind, self.xt.shape[1], len(plan.data.classes), MLP_HIDDEN,
                              head_dropout(plan))
        self.opt = optimizers.AdamW(self.head.parameters(), lr=s.lr,
                                     weight_decay=s.weight_decay)
        steps = s.epochs * math.ceil(len(self.xt) / s.batch_size)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)
        self.views = views

    def run(self, callbacks: CallbackList, state: RunState) -> HeadResult:
        tracker = EarlyStopping(self.s.patience, has_validation=self.xv is not None)
        state.model, state.tracker = self.head, tracker
        for epoch in range(1, self.s.epochs + 1):
            state.epoch = epoch
            callbacks.on_epoch_begin(state, epoch)
            row = self._epoch(epoch)
            state.history.append(row)
            tracker.on_epoch_end(state, epoch, row)
            callbacks.on_epoch_end(state, epoch, row)
            if state.stop_training:
                break
        tracker.restore(self.head)
        self.head.eval()
        best = tracker.best
        has_val = self.xv is not None
        return HeadResult(_fold_standardisation(self.head, self.mean, self.std), state.history,
                          best["epoch"], state.stop_training,
                          best["acc"] if has_val else None, best["loss"] if has_val else None)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.time()
        self.head.train()
        order = torch.randperm(len(self.xt), generator=self.gen)
        total, correct = 0.0, 0
        for s in range(0, len(self.xt), self.s.batch_size):
            idx = order[s : s + self.s.batch_size]
            logits = self.head(self.xt[idx])
            loss = balanced_cross_entropy(logits, self.yt[idx], self.weights,
                                          self.s.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            # reported as validation is: plain cross-entropy, not the smoothed loss optimised
            total += F.cross_entropy(logits.detach(), self.yt[idx], reduction="sum").item()
            correct += int((logits.argmax(1) == self.yt[idx]).sum())
        row = {"epoch": epoch, "lr": self.opt.param_groups[0]["lr"],
               "train_loss": total / len(self.xt), "train_acc": correct / len(self.xt)}
        if self.xv is not None:
            self.head.eval()
            with torch.no_grad():
                lv = self.head(self.xv)
            row["val_loss"] = F.cross_entropy(lv, self.yv).item()
            row["val_acc"] = float((lv.argmax(1) == self.yv).float().mean())
        row["seconds"] = round(time.time() - t0, 3)
        return row


def head_note(plan: RunPlan, fs: FeatureSet, head: HeadResult) -> str:
    x = fs.splits["train"][0]
    msg = f"head    {plan.cfg.head} on {x.shape[0] * x.shape[1]} feature vectors " \
          f"({x.shape[1]} view(s) per image): best epoch {head.best_epoch}/{len(head.history)}"
    return msg + (f", val_acc {head.val_acc:.4f}" if head.val_acc is not None else "")


def head_logits(head: nn.Module, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(feats).float()).numpy()


# -- the bundle's network: backbone + trained head ---------------------------------------
def compose(backbone: Backbone, backbone_model: nn.Module, head: nn.Module, kind: str,
            num_classes: int, dropout: float = HEAD_DROPOUT
            ) -> tuple[nn.Module, dict[str, Any]]:
    """The full network as a registry architecture, so downstream loads it with no training
    code: a linear head goes into the timm model's own classifier slot; an MLP head makes a
    'transfer' network (backbone + head)."""
    from ..models import build_model

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
            "head": kind, "hidden": MLP_HIDDEN, "dropout": dropout, "image_size": size}
    model = build_model("transfer", **args)
    model.backbone.load_state_dict(state)
    model.head.load_state_dict(head.state_dict())
    return model.eval(), {"name": "transfer", "args": args}


#: the name of the pooled-feature tensor inside a composed model.onnx (evaluate runs the head
#: part of the file on cached features from it)
FEATURE_TENSOR = "features"


def compose_onnx(extractor_onnx: Path, head: nn.Module, dim: int, out: Path) -> Path:
    """The bundle's model.onnx without exporting the backbone again (seconds for Lite0): the
    backbone's ONNX that extraction ran, then the head exported alone, merged with
    onnx.compose; its pooled features are the tensor FEATURE_TENSOR. The caller checks the
    result against the composed PyTorch network (export.adopt_onnx)."""
    import onnx
    from onnx import compose

    from ..errors import ModelError
    from ..export import export_onnx

    if not Path(extractor_onnx).is_file():
        raise ModelError("the backbone's ONNX export is not in the feature cache")
    head_file = out.with_name(f".{out.name}.head.onnx")
    try:
        export_onnx(head.eval(), head_file, (dim,))
        body, top = onnx.load(str(extractor_onnx)), onnx.load(str(head_file))
    finally:
        head_file.unlink(missing_ok=True)
    _rename(body.graph, "output", FEATURE_TENSOR)
    top = compose.add_prefix(top, "head/")
    _rename(top.graph, "head/output", "output")
    merged = compose.merge_models(body, top, io_map=[(FEATURE_TENSOR, "head/input")])
    # merge_models keeps both parts' opset imports: one per domain (ONNX Runtime's quantizer
    # refuses a model that imports the default domain twice)
    versions: dict[str, int] = {}
    for opset in merged.opset_import:
        versions[opset.domain] = max(opset.version, versions.get(opset.domain, 0))
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    onnx.save(merged, str(out))
    return out


def _rename(graph, old: str, new: str) -> None:
    """Rename a tensor everywhere in a graph (node inputs and outputs, graph outputs)."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in graph.output:
        if value.name == old:
            value.name = new


# -- fine-tuning the composed network -----------------------------------------------------
def head_dropout(plan: RunPlan) -> float:
    """The mlp head's dropout: --dropout, else HEAD_DROPOUT."""
    return HEAD_DROPOUT if plan.cfg.dropout is None else plan.cfg.dropout


def layer_decay(plan: RunPlan) -> float:
    """finetune's layer-wise lr decay: --layer-decay, else LAYER_DECAY."""
    return LAYER_DECAY if plan.cfg.layer_decay is None else plan.cfg.layer_decay


def backbone_layers(model: nn.Module) -> dict[str, int]:
    """Each backbone parameter's layer group, numbered from the input (timm's, as its
    layer-wise decay groups them: Lite0's stem is 0 and its last block with conv_head 16).
    The classifier (a linear head in a timm model's own slot) is the head, not a group."""
    from timm.models import group_parameters
    from timm.optim._param_groups import auto_group_layers

    body = model.backbone if hasattr(model, "backbone") else model
    if hasattr(body, "group_matcher"):
        layers = group_parameters(body, body.group_matcher(coarse=False), reverse=True)
    else:
        layers = auto_group_layers(body)
    head = body.get_classifier() if body is model and hasattr(body, "get_classifier") else None
    if isinstance(head, nn.Module):
        ids = {id(p) for p in head.parameters()}
        layers = {n: i for n, i in layers.items()
                  if id(body.get_parameter(n)) not in ids}
    return layers


def unfreeze_top(model: nn.Module, n: int | None) -> tuple[int, int]:
    """Freeze all but the backbone's last `n` layer groups (None: none frozen); the head
    always trains. Frozen layers get no gradient (their backward is skipped) and keep their
    BatchNorm statistics (`frozen_bn_train_mode`). Returns (groups training, groups)."""
    body = model.backbone if hasattr(model, "backbone") else model
    layers = backbone_layers(model)
    total = max(layers.values()) + 1 if layers else 1
    if n is None or n >= total:
        return total, total
    for name, param in body.named_parameters():
        if name in layers and layers[name] < total - n:
            param.requires_grad_(False)
    return n, total


def unfreeze_note(trained: int, groups: int, asked: int | None, model_name: str) -> str:
    """What finetuning trains, in words; an --unfreeze over the backbone's groups says so."""
    if trained < groups:
        return f"unfreeze the last {trained} of {groups} layer groups (the rest frozen)"
    over = f" (--unfreeze {asked} is more than {model_name} has)" if asked and asked > groups \
        else ""
    return f"unfreeze all {groups} layer groups{over}"


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float,
                       decay: float = LAYER_DECAY) -> list[dict]:
    """Discriminative learning rates: timm's layer-wise decay over the backbone's blocks
    (the head at lr, each block below at `decay` times the one above)."""
    from timm.optim import param_groups_layer_decay

    body = model.backbone if hasattr(model, "backbone") else model
    groups = param_groups_layer_decay(body, weight_decay=weight_decay, layer_decay=decay)
    if body is not model:
        groups.append({"params": list(model.head.parameters()), "lr_scale": 1.0,
                       "weight_decay": weight_decay})
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def frozen_bn_train_mode(model: nn.Module, frozen_only: bool = False) -> None:
    """Train mode, but BatchNorm keeps its pretrained statistics (a batch of 16-32 photos
    estimates them badly and wrecks the features); `frozen_only`: only in the layers
    `unfreeze_top` froze, so a frozen layer does not change at all."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (
                frozen_only and any(p.requires_grad for p in m.parameters())):
            m.eval()


def frozen_layers_train_mode(model: nn.Module) -> None:
    """frozen_bn_train_mode for the frozen layers alone (`--unfreeze`)."""
    frozen_bn_train_mode(model, frozen_only=True)
