"""`imgrec export`: model.onnx (and model.int8.onnx) agree with PyTorch on real photos."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from bundles import make_tiny_bundle

from imgrec.bundle import read_bundle
from imgrec.cli import main
from imgrec.export import ONNX_INT8_FILE, export_bundle, serving_onnx_path
from imgrec.predict import Predictor

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _both_engines(model, photos: list) -> tuple[np.ndarray, np.ndarray]:
    """The same photos through the same contract, scored by ONNX Runtime and by PyTorch."""
    onnx = Predictor.load(model, engine="onnx")
    torch_ = Predictor.load(model, engine="torch")
    pixels = np.stack([onnx.prepare(p) for p in photos])
    return onnx.probabilities(pixels), torch_.probabilities(pixels)


def test_export_cli_writes_onnx_that_matches_pytorch(tmp_path, sample_photo, capsys):
    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    assert main(["export", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["serve_file"] == "model.onnx" and report["int8"] is None
    assert report["max_abs_diff"] < 1e-4
    bundle = read_bundle(path)
    assert bundle.onnx_path.is_file()
    assert bundle.extra["export"]["serve"] == "model.onnx"
    assert serving_onnx_path(bundle) == bundle.onnx_path

    got, expected = _both_engines(path, [sample_photo(n) for n in PHOTOS])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_export_greyscale_bundle(tmp_path, sample_photo):
    path = make_tiny_bundle(tmp_path / "grey", channels=1, size=28)
    got, expected = _both_engines(path, [sample_photo(n) for n in PHOTOS])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_export_is_recorded_and_refused_when_stale(tmp_path, capsys):
    from imgrec.errors import InputError
    from imgrec.predict import int8_onnx_path

    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    assert main(["export", str(path), "--int8"]) == 0
    out = capsys.readouterr().out
    assert "model.int8.onnx" in out and "serve   uses model.onnx" in out
    assert "calibrated on the sample photos" in out  # the tiny bundle names no training data
    bundle = read_bundle(path)
    assert bundle.extra["export"]["int8"] == ONNX_INT8_FILE
    assert bundle.extra["export"]["int8_top1_agreement"] >= 0.8
    # float32 is served unless --int8 asks for the int8 file
    assert serving_onnx_path(bundle) == bundle.onnx_path
    assert int8_onnx_path(bundle) == path / ONNX_INT8_FILE

    # Modification times do not matter (a copy or an unzipped download changes them)...
    later = (path / ONNX_INT8_FILE).stat().st_mtime + 10
    os.utime(bundle.onnx_path, (later, later))
    assert int8_onnx_path(read_bundle(path)) == path / ONNX_INT8_FILE
    # ...what it was made from does: another model.onnx makes the int8 file stale, refused
    meta = json.loads((path / "imgrec.json").read_text())
    made_from = meta["export"]["int8_source_sha256"]
    assert made_from == meta["files"]["model.onnx"]["sha256"]
    meta["export"]["int8_source_sha256"] = "0" * 64
    (path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="stale"):
        int8_onnx_path(read_bundle(path))
    # and so does an int8 file imgrec.json does not name (left over from another model)
    del meta["export"]["int8"], meta["export"]["int8_source_sha256"]
    (path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="stale"):
        int8_onnx_path(read_bundle(path))

    # Retraining (save_bundle writes new weights) removes both exports.
    from imgrec.network import load_model, save_bundle

    copy = make_tiny_bundle(tmp_path / "copy", int8=True)
    assert (copy / ONNX_INT8_FILE).exists()
    b = read_bundle(copy)
    save_bundle(b, load_model(b))
    assert not (copy / ONNX_INT8_FILE).exists() and not (copy / "model.onnx").exists()

    # Exporting again without --int8 removes the int8 file and records float32 serving.
    export_bundle(path)
    bundle = read_bundle(path)
    assert not (path / ONNX_INT8_FILE).exists()
    assert serving_onnx_path(bundle) == bundle.onnx_path


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgrec: error:") and "neither a bundle folder" in err
    assert err.count("\n") == 1
    assert main(["export", str(tmp_path), "--format", "tflite"]) == 2
    assert "tflite" in capsys.readouterr().err


@pytest.mark.slow
def test_imagenet_export_matches_pytorch_on_photos(sample_photo, capsys):
    assert main(["export", "imagenet"]) == 0
    assert "max probability difference" in capsys.readouterr().out
    photos = [sample_photo(n) for n in PHOTOS]
    got, expected = _both_engines("imagenet", photos)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    onnx = Predictor.load("imagenet", engine="onnx")
    top = onnx.top_k(got[:1], 1)[0][0]
    assert "cat" in top.label.lower()  # chelsea is a tabby cat


def test_ensure_onnx_exports_only_when_missing(tmp_path):
    from imgrec.export import ensure_onnx

    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    assert not (path / "model.onnx").exists()
    bundle = ensure_onnx(path)  # what `imgrec serve` does before the app starts
    assert bundle.onnx_path.is_file()
    stamp = bundle.onnx_path.stat().st_mtime_ns
    assert ensure_onnx(path).onnx_path.stat().st_mtime_ns == stamp  # not exported twice


@pytest.mark.parametrize(("side", "grid"),
                         [(s, g) for s in range(1, 16) for g in (1, 2, 3, 4) if g <= s])
def test_grid_max_pool_equals_adaptive_pooling(side, grid):
    """fast-cnn's grid pooling is AdaptiveMaxPool2d, bin for bin, in operators ONNX has."""
    import torch

    from imgrec.models.scratch import grid_max_pool

    x = torch.randn(2, 3, side, side)
    assert torch.equal(grid_max_pool(side, grid)(x), torch.nn.AdaptiveMaxPool2d(grid)(x))


@pytest.mark.parametrize("stem", ["pool", "space-to-depth"])
@pytest.mark.parametrize("size", [28, 30, 32, 27])
def test_fast_cnn_exports_at_every_grid(tmp_path, size, stem):
    """The MNIST default (28 px: 7 -> 3, a plain max-pool), uneven bins (30, 32 px) and an
    odd side (27 px: the space-to-depth stem pads), with either stem, silently."""
    import warnings

    import onnxruntime as ort
    import torch

    from imgrec.export import export_onnx
    from imgrec.models.registry import build_model

    net = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=size, grid=3,
                      stem=stem).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the user sees no exporter notes
        path = export_onnx(net, tmp_path / "m.onnx", (1, size, size))
    x = torch.randn(3, 1, size, size)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - net(x).numpy()).max() < 1e-5


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_export_leaves_the_bundle_usable(tmp_path, sample_photo, capsys):
    """Bad calibration data is refused before anything is written; a damaged model.onnx or
    model.int8.onnx is what `imgrec export` is told to rebuild, and it does."""
    path = make_tiny_bundle(tmp_path / "tiny")
    before, written = _sha(path / "model.onnx"), (path / "model.onnx").stat().st_mtime_ns
    (tmp_path / "empty").mkdir()
    assert main(["export", str(path), "--int8", "--calibration", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (path / "model.onnx").stat().st_mtime_ns == written  # not even rewritten
    assert not list(path.glob(".*"))
    photo = str(sample_photo("chelsea"))
    assert main(["predict", "--model", str(path), photo]) == 0
    # damaged exports: refused by predict (one line), rebuilt by export
    with open(path / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 16)
    capsys.readouterr()
    assert main(["predict", "--model", str(path), photo]) == 2
    assert "re-export" in capsys.readouterr().err
    assert main(["export", str(path), "--int8"]) == 0
    assert _sha(path / "model.onnx") == before  # a scratch network exports byte for byte
    (path / ONNX_INT8_FILE).write_bytes(b"damaged")
    assert main(["export", str(path)]) == 0
    assert "model.int8.onnx removed" in capsys.readouterr().out
    assert not (path / ONNX_INT8_FILE).exists()
    assert main(["predict", "--model", str(path), photo]) == 0


def test_export_keeps_an_int8_file_made_from_the_same_model_onnx(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "tiny", int8=True)
    made = _sha(path / ONNX_INT8_FILE)
    capsys.readouterr()
    assert main(["export", str(path)]) == 0
    assert "model.int8.onnx kept" in capsys.readouterr().out
    assert _sha(path / ONNX_INT8_FILE) == made
    from imgrec.predict import int8_onnx_path

    assert int8_onnx_path(read_bundle(path)) == path / ONNX_INT8_FILE


def test_serve_int8_needs_no_model_onnx(tmp_path, monkeypatch):
    """`serve --int8` runs model.int8.onnx alone: a bundle without model.onnx is served as it
    is, not exported again (which removed the int8 file it then asked for)."""
    from imgrec.serve import launch

    path = make_tiny_bundle(tmp_path / "tiny", int8=True)
    (path / "model.onnx").unlink()
    served = {}
    monkeypatch.setattr(launch, "run_server", lambda config, *a, **k: served.update(
        config=config))
    assert main(["serve", str(path), "--int8", "--port", "0"]) == 0
    assert served["config"].int8 and not served["config"].torch_fallback
    assert (path / ONNX_INT8_FILE).is_file() and not (path / "model.onnx").exists()


def test_a_copy_of_imgrec_json_and_the_int8_file_alone_serves_and_predicts(
        tmp_path, monkeypatch, capsys, sample_photo):
    """The deployment copy docs/deploy.md describes: imgrec.json + model.int8.onnx, no
    weights, no model.onnx. `serve --int8` and `predict --int8` take it; predict without
    --int8 says to add it."""
    from imgrec.serve import launch

    path = make_tiny_bundle(tmp_path / "tiny", int8=True)
    (path / "model.onnx").unlink()
    (path / "model.safetensors").unlink()
    served = {}
    monkeypatch.setattr(launch, "run_server", lambda config, *a, **k: served.update(
        config=config))
    assert main(["serve", str(path), "--int8", "--port", "0"]) == 0 and served["config"].int8
    photo = str(sample_photo("chelsea"))
    assert main(["predict", "--model", str(path), "--int8", photo, "--top-k", "1"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(path), photo]) == 2
    assert "add --int8" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_calibrates_on_the_training_data_from_any_folder(tmp_path, monkeypatch, capsys):
    """The training data is found again where training read it: a built-in dataset from its
    --data-dir, a folder given as a relative path from another working folder."""
    from conftest import make_shapes_dataset
    from helpers import write_fake_mnist

    write_fake_mnist(tmp_path / "data")
    monkeypatch.delenv("IMGREC_DATA", raising=False)
    assert main(["train", "mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                 "--out", str(tmp_path / "digits"), "--quiet", "--no-tensorboard"]) == 0
    make_shapes_dataset(tmp_path / "shapes", per_class=8, size=32)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "shapes", "--epochs", "1", "--out", str(tmp_path / "shapes-run"),
                 "--quiet", "--no-tensorboard", "--workers", "0"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for run, data in (("digits", "mnist"), ("shapes-run", str(tmp_path / "shapes"))):
        capsys.readouterr()
        assert main(["export", str(tmp_path / run), "--int8", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert f" training images of {data}, agreement on " in report["int8_calibration"], \
            report["int8_calibration"]


def test_int8_calibrates_on_a_folder_of_unlabelled_photos(tmp_path, sample_photo, capsys):
    """Calibration needs no labels: a plain folder of photos is enough."""
    import shutil

    path = make_tiny_bundle(tmp_path / "tiny")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(sample_photo(name), photos / f"{name}.png")
    assert main(["export", str(path), "--int8", "--calibration", str(photos), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["int8_calibration"] == f"4 photos of {photos}"
    assert (path / ONNX_INT8_FILE).is_file()


def test_two_exports_to_one_file_at_once_both_succeed(tmp_path):
    """Two trainings sharing $IMGREC_CACHE (or two studio projects, in threads) exported the
    backbone to one extractor.onnx at once: fixed temporary names made one crash on the
    other's rename, and torch.onnx.export, run in two threads, failed its own assertion."""
    import threading

    import torch

    from imgrec.export import export_onnx

    target = tmp_path / "extractor.onnx"
    errors = []

    def export() -> None:
        try:
            export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), target,
                        (3, 16, 16))
        except Exception as e:  # collected: the assertion below names it
            errors.append(e)

    threads = [threading.Thread(target=export) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extractor.onnx"]


def test_export_of_a_bundle_another_run_writes_is_one_line(tmp_path, capsys):
    """`imgrec export` wrote into a bundle a training (or another export) held, and two
    exports at once crashed on each other: it now takes the bundle's lock, or says who has
    it, in one line, exit 2."""
    from bundles import make_tiny_bundle

    from imgrec.cli import main
    from imgrec.files import FolderLock

    bundle = make_tiny_bundle(tmp_path / "b", export=False)
    held = FolderLock(bundle, "--out").acquire()  # what a training into it holds
    try:
        assert main(["export", str(bundle)]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"bundle {bundle} is in use by another imgrec run" in err[0]
    assert not (bundle / "model.onnx").exists()
    assert main(["export", str(bundle)]) == 0 and (bundle / "model.onnx").is_file()
    assert not (bundle / ".imgrec.lock").exists()


def test_an_int8_model_that_agrees_poorly_is_warned_about(tmp_path, monkeypatch, capsys):
    """export --int8 of a 1-epoch CIFAR net agreed with float32 on 78.5% and said it as
    calmly as 99.8%."""
    from types import SimpleNamespace

    import imgrec.export as export
    from imgrec.export import ExportResult

    def fake(model, fmt, int8, calibration, data_dir, agreement):
        return ExportResult(SimpleNamespace(path=tmp_path), tmp_path / "model.onnx", 1e-6,
                            tmp_path / "model.int8.onnx", 0.2, agreement, "its photos", 40,
                            True)

    for agreement, warned in ((0.785, True), (0.99, False)):
        monkeypatch.setattr(export, "export_bundle",
                            lambda *a, agreement=agreement, **k: fake(*a, **k,
                                                                      agreement=agreement))
        assert main(["export", str(tmp_path / "nowhere"), "--int8"]) == 0
        err = capsys.readouterr().err
        assert ("agrees with float32 on only 78.5%" in err) is warned

