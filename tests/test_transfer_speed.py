"""Issue 12, transfer end to end: reduced-scale JPEG decoding, decoding ahead of inference,
model.onnx written at the end of training (and a failed export keeping the bundle), and
evaluate scoring a features-mode bundle's test images from the feature cache."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.contract import lite_contract, load_input
from imgrec.errors import ModelError
from imgrec.images import decode_image
from imgrec.predict import OnnxEngine, Predictor, in_lanes, lane_count

FAST = dict(model="fast-cnn", image_size=32, batch_size=16, augment="none", workers=0,
            quiet=True, tensorboard=False)


def _photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A smooth colour picture (a JPEG decodes it well at any scale), saved as JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, quality=92)
    return path


# -- reduced-scale decoding -----------------------------------------------------------------
def test_a_large_jpeg_is_decoded_at_reduced_scale_never_below_the_resize(tmp_path):
    need = lite_contract(224, 256).draft_size  # the short side the contract resizes to
    big = decode_image(_photo(tmp_path / "big.jpg", (1200, 800)), 3, draft_size=need)
    assert big.size == (600, 400)  # DCT scaling by 1/2: 1/4 would give a 200 px short side
    assert min(big.size) >= need[0]
    small = decode_image(_photo(tmp_path / "small.jpg", (450, 350)), 3, draft_size=need)
    assert small.size == (450, 350)  # halving would go under 256: decoded whole


def test_reduced_decoding_keeps_the_model_input_close_to_a_full_decode(tmp_path):
    contract = lite_contract(224, 256)
    path = _photo(tmp_path / "big.jpg", (1600, 1100), seed=3)
    with Image.open(path) as im:
        full = contract.to_uint8(im.convert("RGB"))
    reduced = load_input(path, contract)
    assert reduced.shape == full.shape == (3, 224, 224)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 2.0


def test_the_memory_and_aspect_guards_still_apply_with_a_draft_size(tmp_path):
    from imgrec.errors import ExtremeAspectRatio, ImageTooLarge

    strip = _photo(tmp_path / "strip.jpg", (3000, 40))
    with pytest.raises(ExtremeAspectRatio):
        decode_image(strip, 3, draft_size=(256, 256))
    with pytest.raises(ImageTooLarge):
        decode_image(_photo(tmp_path / "b.jpg", (1200, 800)), 3, max_pixels=500_000,
                     draft_size=(256, 256))


# -- inference lanes ------------------------------------------------------------------------
def test_in_lanes_keeps_chunk_order_and_runs_the_lanes_side_by_side():
    busy: list[str] = []
    overlap = threading.Event()
    lock = threading.Lock()

    def work(lane: str, chunk: list[int]) -> tuple[str, list[int]]:
        with lock:
            busy.append(lane)
            if len(set(busy)) == 2:
                overlap.set()
        overlap.wait(2)  # the first lane waits until the other lane is working too
        time.sleep(0.01)
        with lock:
            busy.remove(lane)
        return lane, [i * 10 for i in chunk]

    chunks = [[0, 1], [2], [3, 4, 5], [6]]
    out = list(in_lanes(["a", "b"], work, chunks))
    assert [r[1] for r in out] == [[0, 10], [20], [30, 40, 50], [60]]
    assert overlap.is_set() and {r[0] for r in out} == {"a", "b"}


def test_lane_count_is_one_per_core_at_most_four():
    assert (lane_count(1), lane_count(2), lane_count(16)) == (1, 2, 4)
    assert lane_count() == max(1, min(4, len(os.sched_getaffinity(0))))


# -- model.onnx at the end of training --------------------------------------------------------
def test_a_trained_bundle_has_a_checked_model_onnx_and_evaluate_runs_it(shapes, tmp_path):
    from imgrec.evaluation import evaluate_bundle
    from imgrec.training.api import train

    result = train(str(shapes), epochs=1, out=str(tmp_path / "run"), **FAST)
    bundle = result.bundle
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    assert (bundle.path / "model.onnx").is_file()
    assert meta["export"]["max_abs_diff"] <= 1e-4 and meta["export"]["serve"] == "model.onnx"
    assert "model.onnx" in meta["files"]  # checksummed like the weights
    assert isinstance(Predictor.load(str(bundle.path)).engine, OnnxEngine)
    report = evaluate_bundle(str(bundle.path), str(shapes), "test")
    assert report.engine == "onnx" and report.n > 0 and report.seconds > 0


def test_a_failed_export_warns_once_and_leaves_a_usable_bundle(shapes, tmp_path, monkeypatch,
                                                               capsys):
    import imgrec.export
    from imgrec.training.api import train

    def refuse(*args, **kwargs):
        raise ModelError("cannot export this network to ONNX (simulated)")

    monkeypatch.setattr(imgrec.export, "export_bundle", refuse)
    result = train(str(shapes), epochs=1, out=str(tmp_path / "run"), **FAST)
    err = [line for line in capsys.readouterr().err.splitlines() if "model.onnx" in line]
    assert len(err) == 1 and "simulated" in err[0] and err[0].startswith("warning:")
    path = result.bundle.path
    assert not (path / "model.onnx").exists()
    meta = json.loads((path / "imgrec.json").read_text())
    assert "export" not in meta and "model.onnx" not in meta["files"]
    predictor = Predictor.load(str(path))
    assert predictor.engine.name == "torch"
    preds = predictor.predict([str(next((shapes / "disc").glob("*.png")))])
    assert preds[0][0].label in ("disc", "square")


# -- features mode: composed model.onnx, and the feature cache in evaluate --------------------
@pytest.fixture(scope="module")
def photo_splits(tmp_path_factory, cats_dogs) -> Path:
    """Real photos in train / val / test folders: 10 + 4 + 4 of each class."""
    root = tmp_path_factory.mktemp("photo-splits")
    for split, (src, skip, n) in {"train": ("train", 0, 10), "val": ("validation", 0, 4),
                                  "test": ("validation", 4, 4)}.items():
        for cls in ("cat", "dog"):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((cats_dogs / src / cls).glob("*.jpg"))[skip : skip + n]:
                shutil.copy(f, dst / f.name)
    return root


@pytest.mark.slow
def test_features_bundle_composes_model_onnx_and_evaluate_reuses_the_cache(
        photo_splits, tmp_path, monkeypatch):
    from imgrec.evaluation import evaluate_bundle
    from imgrec.training.api import train

    result = train(str(photo_splits), model="efficientnet_lite0", mode="features", epochs=5,
                   out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    path = result.bundle.path
    t = json.loads((path / "imgrec.json").read_text())["training"]
    assert t["feature_reuse"]["tensor"] == "features"
    # earlier tests of the session may have embedded these photos already (one cache per run)
    assert t["features_computed"] + t["features_cached"] == 36
    assert (t["extract_images_per_s"] > 0) if t["features_computed"] else (
        t["extract_images_per_s"] is None and t["extract_lanes"] is None)
    assert (path / "model.onnx").is_file()
    import onnx

    domains = [o.domain for o in onnx.load(str(path / "model.onnx")).opset_import]
    assert len(domains) == len(set(domains))  # one import per domain: int8 can quantize it
    reused = evaluate_bundle(str(path), str(photo_splits), "test")
    assert reused.from_feature_cache == reused.n == 8 and reused.engine == "onnx"
    monkeypatch.setenv("IMGREC_CACHE", str(tmp_path / "empty-cache"))
    decoded = evaluate_bundle(str(path), str(photo_splits), "test")
    assert decoded.from_feature_cache == 0
    assert reused.inputs == decoded.inputs
    np.testing.assert_allclose(reused.probs, decoded.probs, atol=1e-5)
    # the test metrics training recorded are the same figures
    assert abs(result.test_metrics["accuracy"] - decoded.accuracy) < 1e-9


@pytest.mark.slow
def test_evaluate_ignores_the_cache_when_model_onnx_is_not_the_composed_one(
        photo_splits, tmp_path):
    from imgrec.evaluation import evaluate_bundle
    from imgrec.export import export_bundle
    from imgrec.training.api import train

    result = train(str(photo_splits), model="efficientnet_lite0", mode="features", epochs=3,
                   out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    export_bundle(str(result.bundle.path))  # a re-export: another file, same network
    report = evaluate_bundle(str(result.bundle.path), str(photo_splits), "test")
    assert report.from_feature_cache == 0 and report.n == 8
