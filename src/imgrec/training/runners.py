"""One runner per mode: scratch, features, finetune. Each turns a RunPlan into a bundle with
the same callbacks, the same early-stopping tracker (callbacks.EarlyStopping) and the same
record writer (record.RecordWriter); they differ only in what trains.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..bundle import Bundle, file_digest
from ..errors import ImgrecError, skipped_report
from ..files import output_folder
from ..network import CUSTOM_ARCHITECTURE as CUSTOM
from . import distributed
from .callbacks import (
    CallbackList,
    EarlyStopping,
    ProgressPrinter,
    RunState,
    TensorBoardLogger,
)
from .engine import EpochLoop, LoopResult
from .plan import RunPlan, seed_everything
from .record import RecordWriter
from .transfer import (
    FEATURE_TENSOR,
    FREEZE_BN_BELOW,
    FeatureSet,
    HeadSettings,
    compose,
    compose_onnx,
    extract_features,
    frozen_bn_train_mode,
    frozen_layers_train_mode,
    head_dropout,
    head_logits,
    head_note,
    layer_decay,
    layer_decay_groups,
    train_head,
    unfreeze_note,
    unfreeze_top,
)


@dataclass
class TrainResult:
    bundle: Bundle | None  # None on the ranks other than 0 of a torchrun job (rank 0 writes)
    history: list[dict]
    skipped: dict[str, str]
    test_metrics: dict[str, Any] | None
    seconds: float
    stopped_early: bool = False
    interrupted: bool = False
    terminated: bool = False  # interrupted by SIGTERM (the CLI exits 143, Ctrl-C 130)


def default_callbacks(plan: RunPlan) -> list[Any]:
    """Progress on stderr unless quiet, TensorBoard unless switched off (both on rank 0 only
    under torchrun)."""
    if not plan.world.main:
        return []
    out: list[Any] = [] if plan.cfg.quiet else [ProgressPrinter()]
    if plan.cfg.tensorboard:
        out.append(TensorBoardLogger(plan.out))
    return out


class Runner:
    """What every mode does around its training: the output folder, the seed, the opening
    notes, the callbacks' begin/end, the test metrics and the skipped-files warning."""

    title = "training"

    def __init__(self, plan: RunPlan, callbacks: list[Any] = (), report_skipped: bool = True):
        self.plan = plan
        self.report_skipped = report_skipped
        self.callbacks = CallbackList([*default_callbacks(plan), *callbacks])
        self.state = RunState(plan, epochs=plan.epochs)
        self.record = RecordWriter(plan)

    def run(self) -> TrainResult:
        """Train in a locked output folder; a run that fails removes the folder it made.
        Under torchrun rank 0 alone creates and locks it while the others wait."""
        main = self.plan.world.main
        with output_folder(self.plan.out) if main else nullcontext(), \
                distributed.peers_guard(self.plan.world):
            distributed.barrier(self.plan.world)
            return self._run()

    def _run(self) -> TrainResult:
        t0 = time.time()
        seed_everything(self.plan.cfg.seed)
        self.note(f"data    {self.plan.data.describe()}")
        if self.plan.cfg.patience and not self.plan.has_validation:
            self.note("note    no validation split: --patience (early stopping) has nothing "
                      "to watch (give --val-fraction, or a validation/ folder)")
        if self.plan.world.active:
            self.note(distributed.describe(self.plan))
        logs: dict[str, Any] = {"history": self.state.history}
        self.callbacks.on_train_begin(self.state)
        try:
            bundle, loop = self.train(t0)
            done = not loop.interrupted and bundle is not None  # (an interrupted run stops now)
            if done and self.plan.cfg.onnx:
                self.write_onnx(bundle)  # first: the test split is scored as it will be served
            test = self.test_metrics(bundle) if done else None
            logs.update(history=loop.history, best_epoch=loop.best_epoch, test=test,
                        stopped_early=loop.stopped_early, interrupted=loop.interrupted)
        finally:
            self.record.finish()
            self.callbacks.on_train_end(self.state, logs)
        if loop.skipped and self.plan.world.main and self.report_skipped:  # even --quiet
            print(skipped_report(loop.skipped), file=sys.stderr, flush=True)
        return TrainResult(bundle, loop.history, loop.skipped, test, time.time() - t0,
                           loop.stopped_early, loop.interrupted, loop.terminated)

    def note(self, message: str) -> None:
        self.callbacks.on_note(self.state, message)

    def train(self, t0: float) -> tuple[Bundle, LoopResult]:
        raise NotImplementedError

    def write_onnx(self, bundle: Bundle) -> None:
        """model.onnx, checked against PyTorch, so every bundle serves on ONNX Runtime."""
        self.record.write_onnx(bundle, self.state.model)

    def test_metrics(self, bundle: Bundle) -> dict[str, Any] | None:
        """Accuracy on the test split, scored by the trained network as predict scores it."""
        plan = self.plan
        if "test" not in plan.data.splits or not len(plan.data.splits["test"]):
            return None
        from ..errors import DataError
        from ..evaluation import evaluate_bundle
        from ..network import TorchEngine

        # on the CPU the bundle's model.onnx when training wrote one (ONNX Runtime: MNIST's
        # test split in 0.4 s against 1.3 s eager), else the network in PyTorch
        onnx = plan.device.type == "cpu" and bundle.onnx_path.exists()
        engine = "onnx" if onnx else TorchEngine.from_model(self.state.model, plan.device)
        try:
            report = evaluate_bundle(bundle, plan.data, "test", engine=engine)
        except DataError as e:  # no readable test image: the trained bundle is kept all the same
            self.note(f"test    not scored: {e.message}")
            return None
        self.state.skipped.update(report.skipped)  # bad test files are reported too
        self.record.add_test_metrics(bundle, report.headline(), len(self.state.skipped))
        self.note(f"test    accuracy {report.accuracy:.4f} on {report.n} images")
        return report.headline()


@contextmanager
def input_size_checked(name: str, size: int) -> Iterator[None]:
    """Around building a network and passing it one image: a size its pooling cannot take is
    one line before training (PyTorch's error was an internal error)."""
    try:
        yield
    except RuntimeError as e:
        if "size" not in str(e).lower():
            raise
        raise ImgrecError(f"--image-size {size} is too small for {name} (its pooling layers "
                          "shrink the image to nothing)",
                          "give a larger --image-size, or a smaller network") from None


def _fast_kind(plan: RunPlan) -> str:
    """Where bfloat16 runs fast, in words (why a default recipe went long)."""
    return "a GPU" if plan.device.type == "cuda" else "a CPU with AMX"


class ScratchRunner(Runner):
    """A network from random weights (a registry or timm name, or the caller's module)."""

    def train(self, t0: float) -> tuple[Bundle, LoopResult]:
        plan = self.plan
        model, arch = self.build()
        model = model.to(plan.device)
        n_params = sum(p.numel() for p in model.parameters())
        self.note(f"model   {plan.model_name} ({n_params / 1e6:.2f}M parameters), input "
                  f"{plan.image_size}px x{plan.data.channels}, device {plan.device}")
        if _random_backbone(plan):
            self.note(f"weights random: {plan.cfg.model} trains from scratch (no pretrained "
                      "weights were asked for); for transfer learning give --pretrained or "
                      "--weights FILE, or --model efficientnet_lite0 (ImageNet weights offline)")
        variant = ""
        if plan.recipe == "network":  # the dataset's recipe is tuned for another network
            variant = (f"{plan.data.name}'s data settings with training for a network other "
                       "than its tuned recipe's, ")
        if plan.recipe == "long":
            variant = "long" + ("" if plan.cfg.recipe else f" (the default on {_fast_kind(plan)})")
            variant += ", "
        epochs = f"{plan.epochs} epoch" + ("s" if plan.epochs != 1 else "")
        self.note(f"recipe  {variant}{epochs}, batch {plan.batch_size}, "
                  f"{plan.optimizer} "
                  f"lr {plan.lr:g} one-cycle, label smoothing {plan.label_smoothing:g}, "
                  f"augment {plan.augment.describe()}")
        return self.fit(model, arch, t0, EarlyStopping(plan.patience, plan.has_validation))

    def build(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        plan = self.plan
        if plan.module is not None:
            cls = type(plan.module)
            return plan.module, {"name": CUSTOM, "args": {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "in_channels": plan.data.channels, "num_classes": len(plan.data.classes),
                "image_size": plan.image_size}}
        from ..models import build_model

        args = {"in_channels": plan.data.channels, "num_classes": len(plan.data.classes),
                "image_size": plan.image_size, **plan.model_args}
        with input_size_checked(plan.model_name, plan.image_size):
            model = build_model(plan.model_name, **args)  # some measure their head this way
            with torch.no_grad():
                model.eval()(torch.zeros(1, plan.data.channels, plan.image_size,
                                         plan.image_size))
            model.train()
        return model, {"name": plan.model_name, "args": args}

    def fit(self, model: torch.nn.Module, arch: dict[str, Any], t0: float,
            tracker: EarlyStopping, extra: dict[str, Any] | None = None,
            **loop_options: Any) -> tuple[Bundle, LoopResult]:
        """The epoch loop, then the bundle (restore-best already applied)."""
        self.state.model, self.state.tracker = model, tracker
        epochs = EpochLoop(self.plan, model, self.callbacks, tracker, **loop_options)
        loop = epochs.run(self.state)
        if not self.plan.world.main:
            return None, loop
        # a resumed run's seconds count the interrupted session's epochs too
        seconds = time.time() - t0 + epochs.resumed_seconds
        # the arithmetic the epochs ran in: --precision auto resolves per machine
        precision = str(epochs.amp_dtype or "float32").removeprefix("torch.")
        training = self.record.summary(loop.history, loop.best_epoch, seconds,
                                       loop.stopped_early, loop.interrupted, loop.skipped,
                                       precision=precision, **(extra or {}))
        bundle = self.record.save(model, arch, loop.history, training,
                                  f"{self.plan.model_name} on {self.plan.data.name}",
                                  warmup=getattr(self, "warmup_history", None))
        return bundle, loop


def _random_backbone(plan: RunPlan) -> bool:
    """A timm architecture (the workshops' vgg16, mobilenet, xception) trained from random
    weights because nothing asked for others: a learner typing the Keras name expects
    ImageNet weights, and got 124 s of a network at chance without a word."""
    from ..models.registry import model_config

    return plan.module is None and plan.cfg.mode in (None, "auto") and \
        not (plan.cfg.pretrained or plan.cfg.weights) and \
        model_config(plan.model_name).weights == "timm"


class FinetuneRunner(ScratchRunner):
    """The head warm-up on cached features, then the whole network in the epoch loop with
    layer-wise learning-rate decay and, for small batches, frozen BatchNorm statistics."""

    def train(self, t0: float) -> tuple[Bundle, LoopResult]:
        plan = self.plan
        self.note(f"warm-up {plan.cfg.head} head on frozen {plan.model_name} features")
        fs = extract_features(plan, self.callbacks, self.state)
        head = train_head(fs, plan, HeadSettings.of(plan, warmup=True), self.callbacks,
                          self.state)
        self.note(head_note(plan, fs, head))
        model, arch = compose(plan.backbone, fs.extractor.model(), head.head, plan.cfg.head,
                              len(plan.data.classes), head_dropout(plan))
        freeze = plan.batch_size < FREEZE_BN_BELOW
        decay = layer_decay(plan)
        trained, groups = unfreeze_top(model, plan.cfg.unfreeze)
        which = unfreeze_note(trained, groups, plan.cfg.unfreeze, plan.model_name)
        self.note(f"{which}: layer-wise lr decay {decay:g}, BatchNorm "
                  f"statistics {'frozen' if freeze else 'updated'} (batch {plan.batch_size})")
        model = model.to(plan.device)
        tracker = EarlyStopping(plan.patience, plan.has_validation)
        if head.val_acc is not None:  # the warmed-up network is epoch 0 of restore-best
            tracker.start_from(head.val_acc, head.val_loss, model)
        extra = {**transfer_record(plan, fs), "warmup_best_epoch": head.best_epoch,
                 "warmup_val_acc": head.val_acc, "layer_decay": decay,
                 "unfreeze": trained, "layer_groups": groups, "bn_frozen": freeze}
        self.state.epochs, self.state.history = plan.epochs, []  # the warm-up's was the head's
        self.warmup_history = head.history  # history.csv and curves.png show both stages
        bundle, loop = self.fit(model, arch, t0, tracker, extra,
                                param_groups=layer_decay_groups(model, plan.lr,
                                                                plan.weight_decay, decay),
                                train_mode=frozen_bn_train_mode if freeze else
                                frozen_layers_train_mode if trained < groups else None)
        if loop.history and loop.best_epoch == 0 and head.val_acc is not None:
            # restore-best kept the warm-up: said, not left to imgrec.json's best_epoch 0
            self.note(f"kept    the warm-up head: no finetuning epoch beat its validation "
                      f"(val_acc {head.val_acc:.4f}, val_loss {head.val_loss:.4f}); more "
                      "--epochs or a lower --lr may let finetuning pay")
        return bundle, loop


class FeaturesRunner(Runner):
    """A head on the frozen backbone's cached features; the bundle holds backbone + head."""

    def train(self, t0: float) -> tuple[Bundle, LoopResult]:
        plan = self.plan
        self.note(f"model   {plan.model_name} frozen ({plan.backbone.source} weights), input "
                  f"{plan.image_size}px; {plan.cfg.head} head, {plan.epochs} epochs max, "
                  f"lr {plan.lr:g}")
        self.features = fs = extract_features(plan, self.callbacks, self.state)
        self.state.skipped.update(fs.skipped)
        if not plan.world.main:  # the head (seconds, one thread) trains on rank 0 alone
            return None, LoopResult([], 0, False, False, {})
        head = train_head(fs, plan, HeadSettings.of(plan, warmup=False), self.callbacks,
                          self.state)
        self.note(head_note(plan, fs, head))
        self.head = head.head
        model, arch = compose(plan.backbone, fs.extractor.model(), head.head, plan.cfg.head,
                              len(plan.data.classes), head_dropout(plan))
        self.state.model = model
        loop = LoopResult(head.history, head.best_epoch, head.stopped_early, False,
                          self.state.skipped)
        training = self.record.summary(
            loop.history, loop.best_epoch, time.time() - t0, loop.stopped_early, False,
            loop.skipped, **transfer_record(plan, fs))
        training["optimizer"] = "adamw"
        training["augment"] = plan.augment.describe() if plan.cfg.augment_views else "none"
        bundle = self.record.save(model, arch, loop.history, training,
                                  f"{plan.model_name} features on {plan.data.name}")
        return bundle, loop

    def test_metrics(self, bundle: Bundle) -> dict[str, Any] | None:
        """With flip TTA the bundle's network scores the test images (the real path);
        otherwise head(cached features) is that network's output, so a warm run skips the
        backbone (the ONNX export is checked against PyTorch)."""
        fs = self.features
        if "test" not in fs.splits or not len(fs.splits["test"][0]):
            return None
        if self.plan.contract.tta:
            return super().test_metrics(bundle)
        from ..evaluation import EvalReport
        from ..predict import softmax

        x, y, paths = fs.splits["test"]
        test_paths = set(self.plan.data.splits["test"].paths)
        skipped = {p: r for p, r in fs.skipped.items() if p in test_paths}
        report = EvalReport(list(self.plan.data.classes), y,
                            softmax(head_logits(self.head, x[:, 0])), [str(p) for p in paths],
                            "test", self.plan.data.name, skipped)
        self.record.add_test_metrics(bundle, report.headline(), len(self.state.skipped))
        self.note(f"test    accuracy {report.accuracy:.4f} on {report.n} images")
        return report.headline()


    def write_onnx(self, bundle: Bundle) -> None:
        """model.onnx composed from the backbone's cached export and the head (no second
        export of the backbone); on success, imgrec.json says how evaluate may score test
        images from the feature cache: the extractor's key and the tensor of this file that
        holds the pooled features (its checksum is recorded with the bundle's files)."""
        fs, plan = self.features, self.plan
        ex = fs.extractor
        out = bundle.path / f".{bundle.onnx_path.name}.composed"
        how = self.record.write_onnx(bundle, self.state.model, lambda: compose_onnx(
            ex.cache.folder / "extractor.onnx", self.head, ex.dim, out))
        out.unlink(missing_ok=True)  # left only by a failed composition
        if how == "composed" and not plan.contract.tta:
            bundle.training["feature_reuse"] = {
                "extractor": ex.key, "tensor": FEATURE_TENSOR,
                "onnx_sha256": file_digest(bundle.onnx_path)[1]}
            bundle.write_meta()


def transfer_record(plan: RunPlan, fs: FeatureSet) -> dict[str, Any]:
    """What imgrec.json records about the backbone and its features."""
    b = plan.backbone
    return {"backbone": b.name, "weights_source": b.source, "weights": b.identity,
            "head": plan.cfg.head, "augment_views": plan.cfg.augment_views, **fs.record()}


RUNNERS = {"scratch": ScratchRunner, "features": FeaturesRunner, "finetune": FinetuneRunner}


def run_plan(plan: RunPlan, callbacks: list[Any] = (), report_skipped: bool = True
             ) -> TrainResult:
    """Train what the plan says with the mode's runner (in a process group under torchrun).
    `report_skipped` False: no list of unreadable files on stderr (a search's trials, which
    all read the same files: the final run lists them once)."""
    with distributed.session(plan):
        return RUNNERS[plan.mode](plan, callbacks, report_skipped).run()
