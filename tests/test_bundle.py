"""The model bundle: save/load round trip, clear errors, and no pickle on load."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from imgrec.bundle import FORMAT_VERSION, Bundle, read_bundle
from imgrec.contract import Preprocess
from imgrec.errors import BundleError
from imgrec.models.registry import build_model
from imgrec.network import load_model, save_bundle
from imgrec.predict import Predictor

ARCH = {"name": "fast-cnn", "args": {"in_channels": 1, "num_classes": 3, "image_size": 16,
                                     "width": 8}}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH["name"], **ARCH["args"]).eval()
    contract = Preprocess(input_size=16, channels=1, mean=(0.5,), std=(0.5,), invert="auto")
    bundle = Bundle(tmp_path / "b", ARCH, ["a", "b", "c"], contract,
                    training={"epochs": 1}, metrics={"test": {"accuracy": 0.5}})
    save_bundle(bundle, model)
    return bundle, model


def test_round_trip_weights_and_predictions(saved):
    bundle, model = saved
    files = {p.name for p in bundle.path.iterdir()}
    assert {"imgrec.json", "model.safetensors"} <= files
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["classes"] == ["a", "b", "c"]
    assert meta["preprocess"]["invert"] == "auto"

    again = read_bundle(bundle.path)
    assert again.classes == ["a", "b", "c"]
    assert again.preprocess == bundle.preprocess
    assert again.architecture == ARCH
    assert again.training == {"epochs": 1} and again.metrics["test"]["accuracy"] == 0.5

    loaded = load_model(again)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))

    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16), dtype=np.uint8)
    p1 = Predictor(again, engine="torch", device="cpu").probabilities(pixels)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(bundle.preprocess.normalize(pixels))), 1)
    np.testing.assert_allclose(p1, expected.numpy(), atol=1e-5)


def test_missing_meta(saved):
    bundle, _ = saved
    (bundle.path / "imgrec.json").unlink()
    with pytest.raises(BundleError, match="imgrec.json is missing"):
        read_bundle(bundle.path)


def test_missing_weights(saved):
    bundle, _ = saved
    (bundle.path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        read_bundle(bundle.path)


def test_newer_format_version(saved):
    bundle, _ = saved
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (bundle.path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as e:
        read_bundle(bundle.path)
    assert "newer" in str(e.value) and "upgrade imgrec" in str(e.value).lower()


def test_corrupt_json(saved):
    bundle, _ = saved
    (bundle.path / "imgrec.json").write_text('{"format": "imgrec-bundle", ')
    with pytest.raises(BundleError, match="unreadable"):
        read_bundle(bundle.path)


def test_incomplete_json(saved):
    bundle, _ = saved
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    del meta["classes"]
    (bundle.path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="incomplete"):
        read_bundle(bundle.path)


def test_not_a_folder_and_nonexistent(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle(tmp_path / "nothing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BundleError, match="folder"):
        read_bundle(f)


def test_corrupt_weights(saved):
    bundle, _ = saved
    (bundle.path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(BundleError, match="unreadable weights"):
        load_model(read_bundle(bundle.path))


def test_weights_of_another_architecture(saved):
    bundle, _ = saved
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    meta["architecture"]["args"]["width"] = 16
    (bundle.path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_model(read_bundle(bundle.path))


def test_loading_never_unpickles(saved, monkeypatch):
    bundle, _ = saved
    # A pickle planted beside the weights is never looked at, and no pickle loader runs.
    (bundle.path / "model.pt").write_bytes(pickle.dumps({"evil": 1}))

    def forbidden(*a, **k):
        raise AssertionError("a bundle load unpickled something")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_model(read_bundle(bundle.path))
    assert sum(p.numel() for p in model.parameters()) > 0
    # The weights file itself is safetensors: an 8-byte header length then JSON.
    head = (bundle.path / "model.safetensors").read_bytes()[:9]
    assert head[8:9] == b"{"


def test_save_removes_stale_onnx(saved):
    bundle, model = saved
    (bundle.path / "model.onnx").write_bytes(b"old")
    save_bundle(bundle, model)
    assert not (bundle.path / "model.onnx").exists()
