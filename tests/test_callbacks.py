"""The Python API beneath `imgrec.train("mnist")`: arrays and torch Datasets as data, an
nn.Module as the model, callbacks that see every epoch and can stop the run; and the
command line's progress output being one of those callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import imgrec
from imgrec.bundle import read_bundle
from imgrec.errors import BundleError, ImgrecError
from imgrec.network import load_model
from imgrec.predict import Predictor
from imgrec.training.callbacks import Callback, ProgressPrinter

pytestmark = pytest.mark.slow


def _bars_and_blobs(n: int = 120, side: int = 16, seed: int = 0):
    """Greyscale images: class 0 a vertical bar, class 1 a blob, at random places."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (n, side, side)).astype(np.uint8)
    y = np.arange(n) % 2
    for i in range(n):
        r, c = rng.integers(2, side - 6, 2)
        if y[i] == 0:
            x[i, 1:-1, c : c + 2] = 230
        else:
            x[i, r : r + 5, c : c + 5] = 230
    return x, y


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(128, 2))


class Recorder(Callback):
    """Records epochs and stops the run after `stop_after` of them."""

    def __init__(self, stop_after: int | None = None):
        self.epochs, self.batches, self.end, self.stop_after = [], 0, None, stop_after

    def on_batch_end(self, state, batch, logs):
        self.batches += 1

    def on_epoch_end(self, state, epoch, logs):
        self.epochs.append((epoch, logs["train_loss"], logs.get("val_acc")))
        if self.stop_after and epoch >= self.stop_after:
            state.stop("the recorder had seen enough")

    def on_train_end(self, state, logs):
        self.end = logs


def test_train_arrays_with_a_module_and_a_callback_that_stops(tmp_path):
    x, y = _bars_and_blobs()
    cb = Recorder(stop_after=2)
    result = imgrec.train((x, y), model=_net(), callbacks=[cb], epochs=6, batch_size=16,
                          lr=1e-2, out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    assert [e for e, _, _ in cb.epochs] == [1, 2]  # stopped early by the callback
    assert cb.batches > 0 and all(np.isfinite(loss) for _, loss, _ in cb.epochs)
    assert result.stopped_early and len(result.history) == 2
    assert cb.end["history"] == result.history and cb.end["test"] == result.test_metrics
    bundle = read_bundle(result.bundle.path, need_weights=False)
    assert bundle.architecture["name"] == "custom" and bundle.classes == ["0", "1"]
    assert bundle.training["epochs_run"] == 2 and bundle.training["stopped_early"]
    # imgrec cannot rebuild the caller's class, so the bundle carries its ONNX export,
    # which predict (and serve) run; PyTorch loading says why it cannot.
    assert (result.bundle.path / "model.onnx").is_file()
    probs = Predictor(bundle).probabilities(x[:8, None])
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(BundleError, match="built in Python"):
        load_model(bundle)


def test_train_a_torch_dataset_by_registry_name(tmp_path):
    x, y = _bars_and_blobs(80)

    class Pairs(torch.utils.data.Dataset):
        classes = ["bar", "blob"]

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return torch.from_numpy(x[i])[None], int(y[i])

    cb = Recorder()
    result = imgrec.train(Pairs(), model="fast-cnn", callbacks=[cb], epochs=2, batch_size=16,
                          out=str(tmp_path / "ds"), quiet=True, tensorboard=False)
    assert [e for e, _, _ in cb.epochs] == [1, 2] and not result.stopped_early
    assert result.bundle.classes == ["bar", "blob"]
    assert load_model(result.bundle) is not None  # a registry network reloads in PyTorch


def test_bad_api_input_is_one_clear_error(tmp_path):
    x, y = _bars_and_blobs(20)
    with pytest.raises(ImgrecError, match="images but"):
        imgrec.train((x, y[:5]), quiet=True, out=str(tmp_path / "a"))
    with pytest.raises(ImgrecError, match="nn.Module"):
        imgrec.train((x, y), model=42, quiet=True, out=str(tmp_path / "b"))
    with pytest.raises(ImgrecError, match="unexpected keyword"):
        imgrec.train((x, y), epochz=3, quiet=True)


def test_cli_progress_is_a_callback(shapes, tmp_path, monkeypatch, capsys):
    """`imgrec train` prints its epoch lines through ProgressPrinter; replacing that
    callback's hook changes what the command line shows."""
    from imgrec.cli import main

    seen = []
    real = ProgressPrinter.on_epoch_end

    def spy(self, state, epoch, logs):
        seen.append(epoch)
        real(self, state, epoch, logs)

    monkeypatch.setattr(ProgressPrinter, "on_epoch_end", spy)
    assert main(["train", str(shapes), "--model", "fast-cnn", "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-tensorboard",
                 "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert seen == [1, 2]
    assert "epoch 1/2" in err and "epoch 2/2" in err and "data    " in err
    seen.clear()
    assert main(["train", str(shapes), "--model", "fast-cnn", "--image-size", "32",
                 "--epochs", "1", "-q", "--no-tensorboard", "--workers", "0",
                 "--out", str(tmp_path / "quiet")]) == 0
    assert seen == []  # --quiet: no progress callback at all


def test_a_note_mid_epoch_is_a_line_of_its_own():
    """An interrupt's note comes while the epoch's bar is drawn: the bar is closed first, so
    the note starts its own line instead of trailing the bar's text."""
    import io
    from types import SimpleNamespace

    stream = io.StringIO()
    printer = ProgressPrinter(stream)
    state = SimpleNamespace(stage="train", epochs=3, plan=SimpleNamespace(steps_per_epoch=10))
    printer.on_epoch_begin(state, 1)
    printer.bar.update(3)
    printer.on_note(state, "interrupted before the first epoch finished: nothing saved")
    assert printer.bar is None
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "interrupted before the first epoch finished: nothing saved" in lines


def test_tensorboard_skips_a_resumed_finetunes_warm_up_and_a_refused_runs_file(tmp_path):
    """A resumed finetune logged its (repeated) warm-up again: every warmup/ step twice. A run
    stopped before anything was saved (a refused --resume) left an empty events file each."""
    from types import SimpleNamespace

    from imgrec.training.callbacks import TensorBoardLogger

    logged = []
    logger = TensorBoardLogger(tmp_path)
    logger.tb = SimpleNamespace(epoch=lambda logs, prefix="": logged.append(prefix),
                                close=lambda: None)
    for resume in (False, True):
        state = SimpleNamespace(stage="head", val_confusion=None,
                                plan=SimpleNamespace(mode="finetune",
                                                     cfg=SimpleNamespace(resume=resume)))
        logger.on_epoch_end(state, 1, {"train_loss": 0.5})
    assert logged == ["warmup/"]
    (tmp_path / "events.out.tfevents.1.old").write_text("kept")
    logger.before = set(tmp_path.glob(TensorBoardLogger.EVENTS))
    (tmp_path / "events.out.tfevents.2.mine").write_text("")
    logger.on_train_end(state, {"history": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.out.tfevents.1.old"]


def test_the_heads_last_epoch_is_printed():
    """A features head trained 3 epochs printed `head epoch 1/3` alone (every 10th, and the
    first): the run's last figures were never shown."""
    import io
    from types import SimpleNamespace

    from imgrec.training.callbacks import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(out)
    state = SimpleNamespace(stage="head", epochs=3)
    for epoch in (1, 2, 3):
        printer.on_epoch_end(state, epoch, {"train_loss": 0.5, "train_acc": 0.8})
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == [
        "head epoch 1/3", "head epoch 3/3"]


def test_a_short_epochs_progress_bar_shows_more_than_its_first_batch():
    """The bar's loss and accuracy were set every 20th batch: an 18-batch epoch showed
    batch 0's figures throughout."""
    import io
    from types import SimpleNamespace

    from imgrec.training.callbacks import ProgressPrinter

    printer = ProgressPrinter(io.StringIO())
    state = SimpleNamespace(stage="train", epochs=1, plan=SimpleNamespace(steps_per_epoch=18))
    printer.on_epoch_begin(state, 1)
    shown = []
    for batch in range(18):
        logs = {"seen": 10 * (batch + 1), "loss_sum": 1.0, "correct": 5 * (batch + 1)}
        printer.on_batch_end(state, batch, logs)
        shown.append(printer.bar.postfix)
    assert len(set(shown)) > 1 and shown[-1] is not None
