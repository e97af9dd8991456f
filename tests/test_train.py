"""Training end to end on generated data: the bundle and its record, resume, early stopping,
reproducibility, class weights, and bad files that are skipped and reported."""

from __future__ import annotations

import copy
import csv
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_shapes_dataset
from helpers import truncated_jpeg, write_pixel_csv
from PIL import Image

from imgrec.bundle import read_bundle
from imgrec.errors import ImgrecError
from imgrec.evaluation import evaluate_bundle
from imgrec.network import load_model
from imgrec.predict import Predictor
from imgrec.training.api import plan, train
from imgrec.training.callbacks import Callback
from imgrec.training.engine import EpochLoop
from imgrec.training.engine import class_weights as _class_weights

pytestmark = pytest.mark.slow

FAST = dict(model="fast-cnn", image_size=32, batch_size=16, augment="none", workers=0,
            quiet=True)


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_train_folder_end_to_end(shapes, tmp_path):
    out = tmp_path / "run"
    result = train(str(shapes), epochs=3, out=str(out), **FAST)
    assert result.test_metrics["accuracy"] >= 0.75  # chance is 0.5
    assert len(result.history) == 3 and not result.interrupted and result.skipped == {}
    for name in ("imgrec.json", "model.safetensors", "history.csv", "curves.png",
                 "checkpoint.pt", "config.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])

    bundle = read_bundle(out)
    assert bundle.classes == ["disc", "square"]
    assert bundle.preprocess.input_size == 32 and bundle.preprocess.channels == 3
    assert bundle.metrics["test"]["accuracy"] == result.test_metrics["accuracy"]
    assert bundle.training["epochs_run"] == 3 and bundle.training["seed"] == 0

    report = evaluate_bundle(out, str(shapes), "test")
    assert report.accuracy == pytest.approx(result.test_metrics["accuracy"])
    preds = Predictor.load(out).predict(sorted(str(p) for p in (shapes / "square").glob("*"))[:6],
                                        top_k=2)
    assert sum(p[0].label == "square" for p in preds) >= 4
    assert all(abs(sum(x.probability for x in p) - 1) < 1e-4 for p in preds)


def test_train_pixel_csv_in_memory(tmp_path):
    labels = [i % 4 for i in range(120)]
    path = write_pixel_csv(tmp_path / "letters_train.csv", labels, seed=0)
    write_pixel_csv(tmp_path / "letters_test.csv", [i % 4 for i in range(40)], seed=1)
    result = train(str(path), model="fast-cnn", epochs=3, batch_size=32, quiet=True,
                   tensorboard=False, out=str(tmp_path / "run"), model_args={"width": 8})
    bundle = result.bundle
    assert bundle.preprocess.channels == 1 and bundle.preprocess.input_size == 28
    assert bundle.preprocess.invert == "auto"  # MNIST-style data inverts dark-on-light photos
    assert result.test_metrics["n"] == 40
    assert result.test_metrics["accuracy"] >= 0.6  # chance is 0.25


def test_resume_after_interrupt_continues(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"

    class InterruptInEpoch2(Callback):  # Ctrl-C during the second epoch
        def on_batch_end(self, state, batch, logs):
            if state.epoch == 2:
                raise KeyboardInterrupt

    first = train(str(shapes), epochs=2, out=str(out), callbacks=[InterruptInEpoch2()], **FAST)
    assert first.interrupted and len(first.history) == 1
    assert (out / "model.safetensors").is_file()  # the best so far is saved

    resumed = train(str(shapes), epochs=2, out=str(out), resume=True, **FAST)
    assert not resumed.interrupted
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # epoch 1 came from the checkpoint


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    """Interrupted in epoch 3 and resumed, a run ends as the uninterrupted one did: the
    shuffle generator (saved with the checkpoint) draws epoch 3's order, not epoch 1's
    again, and the early-stopping count goes on."""
    rng = np.random.default_rng(0)
    y = np.arange(96) % 3
    x = (rng.integers(0, 60, (96, 1, 12, 12)) + y[:, None, None, None] * 60).astype(np.uint8)
    opts = dict(model="fast-cnn", image_size=12, batch_size=16, augment="none", quiet=True,
                tensorboard=False, onnx=False, epochs=4, patience=3)

    class InterruptInEpoch3(Callback):
        def on_batch_end(self, state, batch, logs):
            if state.epoch == 3:
                raise KeyboardInterrupt

    whole = train((x, y), out=str(tmp_path / "whole"), **opts)
    first = train((x, y), out=str(tmp_path / "cut"), callbacks=[InterruptInEpoch3()], **opts)
    assert first.interrupted and len(first.history) == 2
    resumed = train((x, y), out=str(tmp_path / "cut"), resume=True, **opts)
    assert _strip(resumed.history) == _strip(whole.history)
    # its seconds count the interrupted session's epochs too (they counted the last only)
    assert resumed.bundle.training["seconds"] >= round(sum(r["seconds"] for r in
                                                           resumed.history), 1) - 0.05
    wa, wb = load_model(whole.bundle).state_dict(), load_model(resumed.bundle).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # image files, read by DataLoader workers that live through the epochs, alike
    folder = tmp_path / "files"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / str(label) / f"{i}.png")
    files = {**opts, "workers": 2}
    whole = train(str(folder), out=str(tmp_path / "fw"), **files)
    train(str(folder), out=str(tmp_path / "fc"), callbacks=[InterruptInEpoch3()], **files)
    resumed = train(str(folder), out=str(tmp_path / "fc"), resume=True, **files)
    assert _strip(resumed.history) == _strip(whole.history)


def test_resume_with_more_epochs_extends(shapes, tmp_path):
    out = tmp_path / "run"
    one = train(str(shapes), epochs=1, out=str(out), **FAST)
    first_events = set(out.glob("events.out.tfevents.*"))
    more = train(str(shapes), epochs=3, out=str(out), resume=True, **FAST)
    # a resumed run continues its curves: the first part's events stay beside the new ones
    assert first_events < set(out.glob("events.out.tfevents.*"))
    assert [r["epoch"] for r in more.history] == [1, 2, 3]
    assert _strip(more.history[:1]) == _strip(one.history)
    assert more.bundle.training["epochs_run"] == 3
    # The extended one-cycle schedule ends annealed, as a fresh 3-epoch run would.
    assert more.history[-1]["lr"] < 1e-5 < more.history[1]["lr"]


def test_a_new_run_into_a_bundle_replaces_its_curves(shapes, tmp_path):
    """Training again into a bundle's folder (no --resume) replaces the bundle, and with it
    the old run's TensorBoard events: one run's curves, not two drawn over the same steps."""
    out = tmp_path / "run"
    train(str(shapes), epochs=1, out=str(out), **FAST)
    old = set(out.glob("events.out.tfevents.*"))
    assert len(old) == 1
    train(str(shapes), epochs=1, out=str(out), **FAST)
    new = set(out.glob("events.out.tfevents.*"))
    assert len(new) == 1 and not new & old


def test_resume_refuses_other_settings(shapes, tmp_path, capsys):
    """A refusal names what differs (it said only "other data, model or settings"); a
    checkpoint with every epoch asked for says there is nothing left to train (it said
    "resume from epoch 2 of 1")."""
    out = tmp_path / "run"
    train(str(shapes), epochs=2, out=str(out), **FAST)
    with pytest.raises(ImgrecError, match="other data, model or settings") as e:
        train(str(shapes), epochs=2, out=str(out), resume=True, **{**FAST, "image_size": 24})
    assert "--image-size" in str(e.value) and "now 24" in str(e.value)
    # the refused run left no events file of its own (an empty one per refusal piled up)
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert "--model" not in str(e.value) and "the data" not in str(e.value)
    capsys.readouterr()
    train(str(shapes), epochs=1, out=str(out), resume=True, **{**FAST, "quiet": False})
    assert "the checkpoint has 2 epochs, --epochs is 1: nothing left to train" in \
        capsys.readouterr().err
    with pytest.raises(ImgrecError, match="no checkpoint"):
        train(str(shapes), epochs=1, out=str(tmp_path / "fresh"), resume=True, **FAST)
    # the recipe's options too: another optimizer failed on the saved state (KeyError:
    # 'dampening'), another lr or augmentation was recorded for epochs it never ran
    for change, needle in (({"optimizer": "sgd"}, "--optimizer 'adamw', now 'sgd'"),
                           ({"lr": 0.5}, ", now 0.5"),
                           ({"augment": "flip"}, "--augment 'none', now 'flip'"),
                           ({"seed": 3}, "--seed 0, now 3; so the data's splits")):
        with pytest.raises(ImgrecError, match="other data, model or settings") as e:
            train(str(shapes), epochs=3, out=str(out), resume=True, **{**FAST, **change})
        assert needle in str(e.value), str(e.value)


def test_same_seed_same_history(shapes, tmp_path):
    a = train(str(shapes), epochs=2, out=str(tmp_path / "a"), seed=7, tensorboard=False, **FAST)
    b = train(str(shapes), epochs=2, out=str(tmp_path / "b"), seed=7, tensorboard=False, **FAST)
    assert _strip(a.history) == _strip(b.history)
    wa, wb = load_model(a.bundle).state_dict(), load_model(b.bundle).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_early_stopping_restores_best(shapes, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.9, 0.6, 0.6, 0.6, 0.6])
    states = []

    def fake_validate(self, state):
        states.append(copy.deepcopy(self.model.state_dict()))
        return 0.5, next(scripted)

    monkeypatch.setattr(EpochLoop, "validate", fake_validate)
    result = train(str(shapes), epochs=6, patience=2, out=str(tmp_path / "run"),
                   tensorboard=False, **FAST)
    assert result.stopped_early and len(result.history) == 4
    assert result.bundle.training["best_epoch"] == 2
    saved = load_model(read_bundle(result.bundle.path)).state_dict()
    best = states[1]
    assert all(torch.equal(saved[k].cpu(), best[k].cpu()) for k in saved)
    assert not all(torch.equal(saved[k].cpu(), states[3][k].cpu()) for k in saved)


@pytest.mark.parametrize(("option", "value", "says"), [
    ("epochs", "two", "--epochs must be a whole number"),
    ("batch_size", 3.5, "--batch-size must be a whole number"),
    ("lr", "0.1", "--lr must be a number"),
    ("seed", True, "--seed must be a whole number"),
])
def test_numbers_of_the_wrong_type_are_one_clear_error(shapes, tmp_path, option, value, says):
    """The Python API's `epochs="two"` failed inside a comparison (a builtin TypeError);
    NumPy's numbers are numbers."""
    with pytest.raises(ImgrecError, match=says):
        train(str(tmp_path), out=str(tmp_path / "o"), **{option: value})
    assert plan(str(shapes), epochs=np.int64(2), lr=np.float32(0.01), **FAST).epochs == 2


def test_array_labels_and_callbacks_are_checked(tmp_path):
    """Labels 0.5 / 1.5 were taken as two classes; callbacks=[1] or a class instead of an
    instance failed deep in the run; the default --out of a custom network had a colon."""
    from torch import nn

    x = np.zeros((20, 8, 8, 1), np.uint8)
    with pytest.raises(ImgrecError, match="not whole"):
        train((x, np.array([0.5, 1.5] * 10)), out=str(tmp_path / "a"), **FAST)
    for bad in (1, Callback):
        with pytest.raises(ImgrecError, match="is no callback object"):
            train((x, np.array([0, 1] * 10)), out=str(tmp_path / "b"), callbacks=[bad], **FAST)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    options = {k: v for k, v in FAST.items() if k != "model"}
    p = plan((x, np.array([0.0, 1.0] * 10)), net, **{**options, "image_size": 8})
    assert ":" not in str(p.out) and p.data.classes == ["0", "1"]


def test_class_weights_weigh_images_not_the_smoothing():
    """Each image's smoothed loss is weighted by its own class: a batch of one class scores
    the same whatever the other classes weigh. F.cross_entropy(weight=...) weighs the
    smoothing term's classes too, which pulled every image towards a rare class (a class of
    one photo made a cats-vs-dogs model worse than chance)."""
    from imgrec.training.engine import balanced_cross_entropy

    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    rare = torch.tensor([0.4, 1.0, 40.0])
    plain = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(balanced_cross_entropy(logits, y, rare, 0.1), plain)
    assert not torch.allclose(F.cross_entropy(logits, y, weight=rare, label_smoothing=0.1),
                              plain, atol=0.1)  # PyTorch's way: the rare class pulls
    mixed = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])  # without smoothing: PyTorch's weighted mean
    assert torch.allclose(balanced_cross_entropy(logits, mixed, rare),
                          F.cross_entropy(logits, mixed, weight=rare))


def test_class_weights_for_imbalanced_folder(tmp_path, monkeypatch):
    data = make_shapes_dataset(tmp_path / "imb", per_class=40)
    for p in sorted((data / "square").glob("*.png"))[12:]:
        p.unlink()  # 40 discs vs 12 squares
    from imgrec.training import engine

    weights_seen = []
    real = engine.balanced_cross_entropy

    def spy(logits, y, weights, smoothing=0.0):
        if weights is not None:
            weights_seen.append(weights.detach().cpu())
        return real(logits, y, weights, smoothing)

    monkeypatch.setattr(engine, "balanced_cross_entropy", spy)
    train(str(data), epochs=1, out=str(tmp_path / "run"), tensorboard=False, **FAST)
    assert weights_seen, "no class weights reached the loss"
    w = weights_seen[0]
    assert w[1] > 2 * w[0]  # the rare class (square) weighs more
    assert _class_weights(np.array([0, 0, 1, 1]), 2, "auto", "cpu") is None  # balanced
    assert _class_weights(np.array([0, 0, 1, 1]), 2, "balanced", "cpu") is not None
    assert _class_weights(np.array([0] * 9 + [1]), 2, "none", "cpu") is None


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_reported(tmp_path, capsys, workers):
    data = make_shapes_dataset(tmp_path / "bad", per_class=30)
    truncated_jpeg(data / "disc" / "broken.jpg")
    (data / "square" / "notes.jpg").write_text("this is not a picture\n")
    result = train(str(data), epochs=1, out=str(tmp_path / "run"), tensorboard=False,
                   **{**FAST, "workers": workers})
    skipped = {p.split("/")[-1]: why for p, why in result.skipped.items()}
    assert set(skipped) == {"broken.jpg", "notes.jpg"}
    assert "truncated" in skipped["broken.jpg"] and "not an image" in skipped["notes.jpg"]
    err = capsys.readouterr().err  # listed at the end even with --quiet
    assert "skipped 2 unreadable file(s)" in err
    assert "broken.jpg" in err and "notes.jpg" in err
    assert read_bundle(result.bundle.path).training["skipped_files"] == 2


def test_invalid_config():
    for bad in ({"epochs": 0}, {"optimizer": "foo"}, {"lr": -1.0}, {"invert": "maybe"},
                {"image_size": 4}):
        with pytest.raises(ImgrecError):
            plan("mnist", **bad)


def test_optimizers_all_train(shapes, tmp_path):
    small = make_shapes_dataset(tmp_path / "small", per_class=10)
    for name in ("sgd", "rmsprop", "adam"):
        r = train(str(small), epochs=1, optimizer=name, out=str(tmp_path / name),
                  tensorboard=False, **FAST)
        assert r.bundle.training["optimizer"] == name
        assert np.isfinite(r.history[0]["train_loss"])
    shutil.rmtree(tmp_path / "small")


def test_public_train_function_survives_importing_the_training_package():
    import imgrec
    import imgrec.training.api  # noqa: F401

    assert callable(imgrec.train) and callable(imgrec.evaluate)


def test_an_image_size_a_network_cannot_take_is_one_line(shapes, tmp_path, capsys):
    """small-cnn pools 16 px to nothing: one line and exit 2, not an internal error."""
    from imgrec.cli import main

    assert main(["train", str(shapes), "--model", "small-cnn", "--image-size", "16",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--image-size 16 is too small for small-cnn" in err
    assert not (tmp_path / "run").exists()


def test_a_run_too_short_for_a_cycle_keeps_its_peak_lr():
    """A few batches in all (a tiny folder, 1-3 epochs): one-cycle's warm-up and annealing
    left it at 4e-5 then 4e-9; under SHORT_RUN steps the lr stays at its peak."""
    from imgrec.training.engine import SHORT_RUN, one_cycle

    for steps, flat in ((2, True), (SHORT_RUN - 1, True), (SHORT_RUN * 4, False)):
        p = [torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD(p, lr=1e-3)
        sched = one_cycle(opt, 1e-3, steps)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert (max(lrs) - min(lrs) < 1e-12) == flat, (steps, lrs)
        assert max(lrs) == pytest.approx(1e-3)


def test_sigterm_to_the_whole_process_group_saves_the_best_model(tmp_path):
    """`timeout`, `kill -- -PGID` and systemd signal every process of the group, the
    DataLoader's workers too: they leave the signal to the main process, which saves the best
    model so far and exits 143 (the workers died first, and the run with an internal error)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_shapes_dataset(tmp_path / "shapes", per_class=48)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    exe = os.path.join(os.path.dirname(sys.executable), "imgrec")
    cmd = [exe, "train", str(data), "--model", "fast-cnn", "--image-size", "32", "--epochs",
           "200", "--workers", "2", "--out", str(out), "--no-tensorboard", "--augment", "none"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "epoch 2/200" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 143, log.read_text()[-2000:]
    text = log.read_text()
    assert "internal error" not in text and "saving the best model so far" in text
    assert (out / "imgrec.json").is_file() and (out / "model.safetensors").is_file()


def test_a_class_none_of_whose_training_images_reads_is_refused_in_scratch_mode(shapes,
                                                                                tmp_path):
    """A scratch network kept an output for a class none of whose files could be read and
    could predict it; the first pass, which tries every file once, now refuses the run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "ghost").mkdir()
    for i in range(4):
        (data / "ghost" / f"g{i}.png").write_bytes(b"not an image")
    with pytest.raises(ImgrecError, match="class\\(es\\) 'ghost': none of their training"):
        train(str(data), epochs=2, out=str(tmp_path / "run"), **FAST)
    assert not (tmp_path / "run").exists()


def test_the_record_holds_the_options_that_shaped_the_run(shapes, tmp_path, capsys):
    """imgrec.json lacked the weight decay, patience and class weighting (only config.json
    had what was asked); --class-weights balanced on balanced classes said "imbalanced"."""
    from imgrec.training.engine import weights_note

    run = train(str(shapes), epochs=1, out=str(tmp_path / "run"), weight_decay=0.01,
                patience=3, class_weights="balanced", **FAST)
    t = run.bundle.training
    assert (t["weight_decay"], t["patience"], t["class_weights"]) == (0.01, 3, "balanced")
    # the arithmetic --precision auto resolved to on this machine, not the option's "auto"
    from imgrec.training.engine import autocast_dtype

    expected = autocast_dtype("auto", torch.device("cpu"))
    assert t["precision"] == ("bfloat16" if expected == torch.bfloat16 else "float32")
    forced = train(str(shapes), epochs=1, out=str(tmp_path / "fp32"), precision="fp32", **FAST)
    assert forced.bundle.training["precision"] == "float32"
    assert weights_note("balanced").startswith("--class-weights balanced: the loss weighs")
    assert weights_note("auto").startswith("classes are imbalanced")


def test_history_shows_the_rate_of_the_runs_lr():
    """Finetuning gives the backbone's layers lower rates: history's lr column showed the
    lowest layer's (0.00014 for --lr 0.001), not the head's."""
    from types import SimpleNamespace

    groups = [{"lr": 1.4e-4, "max_lr": 1.4e-4}, {"lr": 5e-4, "max_lr": 5e-4},
              {"lr": 1e-3, "max_lr": 1e-3}]
    loop = SimpleNamespace(opt=SimpleNamespace(param_groups=groups), plan=SimpleNamespace(lr=1e-3))
    assert EpochLoop.reported_lr(loop) == 1e-3
    loop.plan.lr = 0.05  # no group at the run's lr: the first
    assert EpochLoop.reported_lr(loop) == 1.4e-4


def test_a_figure_that_fails_to_draw_never_costs_the_run(capsys):
    """Ctrl-C while the main thread imported matplotlib left the thread drawing curves.png a
    half-imported module; its AttributeError became an internal error that lost the
    checkpoint. The drawing is tried again, and a second failure is one warning line."""
    from types import SimpleNamespace

    from imgrec.training.record import Background, RecordWriter

    calls = []

    def draw_fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise AttributeError("module 'matplotlib' has no attribute 'get_data_path'")

    holder = SimpleNamespace(curves=Background(draw_fails_once))
    RecordWriter.finish(holder)
    assert len(calls) == 2 and holder.curves is None

    def never():
        raise AttributeError("broken")

    RecordWriter.finish(SimpleNamespace(curves=Background(never)))
    assert "warning: curves.png was not drawn (AttributeError: broken)" in capsys.readouterr().err
