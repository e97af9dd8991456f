"""The Python API as a notebook uses it: arrays in the scales and types NumPy hands out, the
caller's process state (random generators, matplotlib's backend, torch's threads) left as it
was, and callbacks checked before the run."""

from __future__ import annotations

import random

import matplotlib
import numpy as np
import pytest
import torch

import imgrec
from imgrec.data.arrays import as_uint8_images
from imgrec.errors import DataError, ImgrecError
from imgrec.training.callbacks import Callback

TINY = dict(model="fast-cnn", epochs=1, batch_size=16, augment="none", workers=0, quiet=True,
            onnx=False)


def _arrays(n: int = 48, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = rng.integers(0, 60, (n, side, side), dtype=np.uint8)
    x[y == 1, 4:12, 4:12] = 220  # a bright square: class 1
    return x, y


def test_pixels_neither_0_1_nor_0_255_are_refused_not_darkened():
    """Standardised images became uint8 0..3, and one pixel at 1.0001 in 0..1 data turned the
    whole set near-black; the runs learned nothing, without a word."""
    x, _ = _arrays(4)
    unit = x / 255.0
    assert np.array_equal(as_uint8_images(unit), as_uint8_images(x))
    nudged = unit.copy()
    nudged[0, 0, 0] = 1.0001  # rounding above 1: still 0..1
    assert as_uint8_images(nudged).max() == 255
    assert np.array_equal(as_uint8_images(x.astype(np.float32)), as_uint8_images(x))
    for bad in ((unit - 0.5) / 0.25, x.astype(np.float32) * 200, unit * 3):
        with pytest.raises(DataError, match="0..1 or 0..255"):
            as_uint8_images(bad)
    nan = unit.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        as_uint8_images(nan)


def test_numpy_numbers_as_options_train_and_write_the_bundle(tmp_path):
    """epochs=np.int64(1) passed the checks, trained, and then writing imgrec.json failed
    (int64 is not JSON), leaving a broken folder."""
    x, y = _arrays()
    run = imgrec.train((x, y), out=str(tmp_path / "run"),
                       **{**TINY, "epochs": np.int64(1), "lr": np.float32(0.01),
                          "batch_size": np.int32(16)})
    assert (tmp_path / "run" / "imgrec.json").is_file()
    t = run.bundle.training
    assert (t["epochs"], t["batch_size"]) == (1, 16) and type(t["lr"]) is float


@pytest.fixture
def svg_backend():
    """matplotlib on the svg backend for the test, the suite's own backend back after it."""
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(previous)


def test_a_run_leaves_the_callers_process_as_it_found_it(tmp_path, monkeypatch, svg_backend):
    """train reseeded the global generators (the notebook's next np.random.rand() was seed
    0's), switched matplotlib to Agg (inline plots stopped) and, with IMGREC_THREADS, left
    torch on that many threads."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("IMGREC_THREADS", "1")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    x, y = _arrays()
    imgrec.train((x, y), out=str(tmp_path / "run"), **TINY)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert matplotlib.get_backend() == "svg"
    assert torch.get_num_threads() == threads


def test_callbacks_are_checked_before_the_run(tmp_path):
    """callbacks=None and one callback alone raised TypeError; a misspelled hook
    (on_epoch_ends) was silently never called."""

    class Counter(Callback):
        epochs = 0

        def on_epoch_end(self, state, epoch, logs):
            Counter.epochs += 1

    class Typo(Callback):
        def on_epoch_ends(self, state, epoch, logs):
            pass

    x, y = _arrays()
    imgrec.train((x, y), out=str(tmp_path / "a"), callbacks=Counter(), **TINY)
    imgrec.train((x, y), out=str(tmp_path / "b"), callbacks=None, **TINY)
    assert Counter.epochs == 1
    with pytest.raises(ImgrecError, match="on_epoch_ends is no hook.*on_epoch_end"):
        imgrec.train((x, y), out=str(tmp_path / "c"), callbacks=[Typo()], **TINY)
    assert not (tmp_path / "c").exists()


def test_data_in_python_gives_one_clear_line_when_it_is_not_images_and_labels():
    """A list [x, y], a 3-tuple, a dict, labels beyond `classes`, images of several sizes
    and mixed label types raised TypeError, KeyError, IndexError (mid-training) or
    ValueError; Keras's one-hot labels were 3000 labels for 300 images."""
    from imgrec.data.arrays import dataset_from_arrays, dataset_from_torch

    x, y = _arrays(20)
    one_hot = np.eye(2)[y]
    assert np.array_equal(dataset_from_arrays(x, one_hot, test_fraction=0, val_fraction=0)
                          .splits["train"].labels, y)
    cases = [
        (lambda: imgrec.train([x, y], **TINY), "label is a ndarray.*tuple \\(x, y\\)"),
        (lambda: imgrec.train((x, y, y), **TINY), "has 3 items"),
        (lambda: imgrec.train({"x": x, "y": y}, **TINY), "cannot read item 0"),
        (lambda: dataset_from_arrays(x, one_hot * 2), "not one-hot"),
        (lambda: dataset_from_arrays(x, y + 5, classes=["a", "b"]), "run from 5 to 6"),
        (lambda: dataset_from_arrays(x[:2], np.array([3, "cat"], dtype=object)), "mix int and"),
        (lambda: dataset_from_torch([(x[0], 0), (x[0, :8], 1)]), "differ in shape"),
    ]
    for call, message in cases:
        with pytest.raises(ImgrecError, match=message):
            call()


def test_evaluate_takes_what_train_takes_and_a_train_result(tmp_path):
    """evaluate(bundle, Path(...)) and evaluate(bundle, (x, y)) raised AttributeError;
    Predictor.load(result) put the whole object's repr in its error."""
    x, y = _arrays(64)
    run = imgrec.train((x, y), out=str(tmp_path / "run"), **{**TINY, "epochs": 3})
    report = imgrec.evaluate(run, (x[:10], y[:10]))
    assert report.split == "all" and len(report.y_true) == 10
    assert imgrec.Predictor.load(run).predict(x[:3], top_k=1)[0][0].label in {"0", "1"}
    with pytest.raises(ImgrecError, match="cannot open a model from a dict"):
        imgrec.Predictor.load({"a": 1})
    with pytest.raises(DataError, match="cannot evaluate on a list"):
        imgrec.evaluate(run, [1, 2])
    assert len(repr(report)) < 400


def test_the_search_figures_are_drawn_on_any_backend_and_leave_it(tmp_path, svg_backend):
    """Optuna's importance figure measures text with the canvas's renderer, which the svg
    backend lacks: with a caller's svg backend it was left out (AssertionError)."""
    import optuna

    from imgrec.tuning.plots import PLOTS, draw_plots

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x, y = trial.suggest_float("lr", 1e-4, 1e-1, log=True), trial.suggest_int("n", 1, 5)
        for epoch in range(3):
            trial.report(x * epoch + y, epoch)
        return x + y

    study.optimize(objective, n_trials=8)
    written, notes = draw_plots(study, tmp_path, "val_loss")
    assert notes == [] and sorted(p.name for p in written) == sorted(PLOTS)
    assert matplotlib.get_backend() == "svg"


def test_predict_reads_three_greyscale_images_and_numpy_string_paths(tmp_path):
    """A batch of exactly 3 greyscale images (3 x H x W) was taken for one colour image;
    np.str_ paths (from an array of names) were taken for arrays; a Dataset was read twice
    per item; callbacks given as a generator were used up by the checks."""
    from PIL import Image

    from imgrec.data.arrays import dataset_from_torch
    from imgrec.training.api import checked_callbacks

    x, y = _arrays(64)
    run = imgrec.train((x, y), out=str(tmp_path / "run"), **{**TINY, "epochs": 2})
    p = imgrec.Predictor.load(run)
    assert len(p.predict(x[:3])) == 3 and len(p.predict(x[:4])) == 4
    Image.fromarray(x[0]).save(tmp_path / "a.png")
    (got,) = p.predict(np.array([str(tmp_path / "a.png")])[0])
    assert isinstance(got, list)

    class Counting:
        calls = 0

        def __len__(self):
            return 4

        def __getitem__(self, i):
            Counting.calls += 1
            return x[i], int(y[i])

    dataset_from_torch(Counting(), val_fraction=0, test_fraction=0)
    assert Counting.calls == 4

    class Hook(Callback):
        def on_epoch_end(self, state, epoch, logs):
            pass

    assert len(checked_callbacks(cb for cb in [Hook(), Hook()])) == 2
