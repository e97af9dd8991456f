"""The model bundle: save/load round trip, clear errors, and no pickle on load."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import sys

import numpy as np
import pytest
import torch

from imgrec.bundle import (
    FORMAT_VERSION,
    Bundle,
    atomic_write_bytes,
    onnx_output_size,
    read_bundle,
    serving_onnx_path,
)
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


@pytest.mark.parametrize(("key", "value", "says"), [
    ("input_size", 0, "input_size must be a whole number"),
    ("input_size", 2.5, "input_size must be a whole number"),
    ("resize_to", 10**9, "resize_to must be a whole number"),
    ("std", 0.0, "std positive"),
    ("mean", float("nan"), "mean must be finite"),
    ("resize", "stretch", "resize must be squash or shorter"),
    ("invert", "maybe", "invert must be auto, yes or no"),
    ("temperature", -1.0, "temperature must be a positive number"),
])
def test_an_out_of_range_description_is_refused_when_read(saved, key, value, says):
    """A hand-edited imgrec.json fails when the bundle is read, in one line naming the file
    and the value; before, every request after answered 500 or null probabilities."""
    bundle, _ = saved
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    if key == "temperature":
        meta[key] = value
    elif key in ("mean", "std"):
        meta["preprocess"][key] = [value] * meta["preprocess"]["channels"]
    else:
        meta["preprocess"][key] = value
        if key == "resize_to":
            meta["preprocess"]["resize"] = "shorter"
    (bundle.path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=says) as e:
        read_bundle(bundle.path)
    assert str(bundle.path / "imgrec.json") in str(e.value) and "\n" not in str(e.value)


def test_not_a_folder_and_nonexistent(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle(tmp_path / "nothing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BundleError, match="folder"):
        read_bundle(f)


def test_corrupt_weights_of_a_bundle_without_checksums(saved):
    bundle, _ = saved
    _edit_meta(bundle, lambda m: m.pop("files"))
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


# -- checked, not trusted (issue 11) ----------------------------------------------------------
def _edit_meta(bundle, change) -> dict:
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    change(meta)
    (bundle.path / "imgrec.json").write_text(json.dumps(meta))
    return meta


def test_weights_checksum_is_recorded(saved):
    bundle, _ = saved
    data = (bundle.path / "model.safetensors").read_bytes()
    meta = json.loads((bundle.path / "imgrec.json").read_text())
    assert meta["files"] == {"model.safetensors": {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


def test_truncated_weights_are_refused_on_reading(saved):
    bundle, _ = saved
    weights = bundle.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BundleError) as e:
        read_bundle(bundle.path)
    assert str(weights) in str(e.value) and "truncated" in str(e.value)


def test_altered_weights_are_refused_on_reading(saved):
    """Same size, one byte changed in a tensor: loads (and predicts garbage) without the
    checksum; with it, one line naming the file."""
    bundle, _ = saved
    weights = bundle.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256") as e:
        read_bundle(bundle.path)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BundleError):
        Predictor.load(bundle.path, engine="torch")


def test_bundle_without_checksums_still_loads(saved):
    bundle, model = saved
    _edit_meta(bundle, lambda m: m.pop("files"))
    loaded = load_model(read_bundle(bundle.path))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_class_list_shorter_than_the_outputs(saved):
    """Three outputs, two classes: once an IndexError at predict, now refused on reading
    (num_classes recorded) or on loading (the network's output, a custom builder)."""
    bundle, _ = saved
    _edit_meta(bundle, lambda m: m.update(classes=["a", "b"]))
    with pytest.raises(BundleError, match="3 outputs .* 2 classes") as e:
        read_bundle(bundle.path)
    assert "imgrec.json" in str(e.value)


def test_network_output_checked_at_load(saved, monkeypatch):
    bundle, _ = saved
    _edit_meta(bundle, lambda m: (m.update(classes=["a", "b", "c", "d"]),
                                  m["architecture"]["args"].pop("num_classes")))
    import imgrec.models as models

    real = models.build_model
    monkeypatch.setattr(models, "build_model", lambda name, **a: real(name, num_classes=3, **a))
    again = read_bundle(bundle.path)
    with pytest.raises(BundleError, match="gives 3 outputs but the bundle lists 4 classes") as e:
        load_model(again)
    assert "model.safetensors" in str(e.value)
    with pytest.raises(BundleError):
        Predictor(again, engine="torch", device="cpu")


def test_paths_outside_the_bundle_are_refused(saved):
    bundle, _ = saved
    for change, where in [
        (lambda m: m.update(export={"serve": "../../elsewhere/model.onnx"}), "export.serve"),
        (lambda m: m.update(export={"serve": "/etc/passwd"}), "export.serve"),
        (lambda m: m["files"].update({"../model.safetensors": {"bytes": 1}}), "files"),
        (lambda m: m.update(export={"int8": "sub/model.int8.onnx"}), "export.int8"),
    ]:
        original = (bundle.path / "imgrec.json").read_text()
        _edit_meta(bundle, change)
        with pytest.raises(BundleError, match="a path outside the bundle") as e:
            read_bundle(bundle.path)
        assert where in str(e.value) and "imgrec.json" in str(e.value)
        (bundle.path / "imgrec.json").write_text(original)
    read_bundle(bundle.path)


@pytest.fixture
def exported(tmp_path):
    from bundles import make_tiny_bundle

    return make_tiny_bundle(tmp_path / "tiny")


def test_onnx_checksum_and_output_size(exported):
    path = exported
    bundle = read_bundle(path, need_weights=False)
    onnx = path / "model.onnx"
    assert onnx_output_size(onnx) == 3
    assert bundle.extra["files"]["model.onnx"]["sha256"] == hashlib.sha256(
        onnx.read_bytes()).hexdigest()
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256") as e:
        read_bundle(path, need_weights=False)
    assert str(onnx) in str(e.value)


def test_onnx_output_size_must_match_the_classes(exported, tmp_path):
    """The ONNX path (serve's): a class list edited by hand, the weights' num_classes gone
    with it, is refused before a session is created; once, serve answered IndexError."""
    path = exported
    meta = json.loads((path / "imgrec.json").read_text())
    meta["classes"] = meta["classes"][:2]
    meta["architecture"]["args"].pop("num_classes")
    (path / "imgrec.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="3 outputs but the bundle lists 2 classes") as e:
        read_bundle(path, need_weights=False)
    assert "model.onnx" in str(e.value)
    with pytest.raises(BundleError):
        Predictor.load(path)
    (path / "model.safetensors").unlink()
    (path / "model.onnx").write_bytes(b"not a protobuf")
    meta.pop("files")
    (path / "imgrec.json").write_text(json.dumps(meta))
    assert serving_onnx_path(read_bundle(path, need_weights=False)).name == "model.onnx"


def test_cli_says_one_line_and_exits_2(exported, tmp_path, capsys):
    from PIL import Image

    from imgrec.cli import main

    path = exported
    onnx = path / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    code = main(["predict", str(img), "--model", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("imgrec: error: ") and "model.onnx" in err[0]


def test_atomic_write_flushes_fsyncs_and_renames(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "sub" / "model.safetensors"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    assert synced[0] is False  # the file's data, then
    if sys.platform != "win32":
        assert synced[-1] is True  # the folder holding the rename
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    target.chmod(0o640)
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sys.platform == "win32" or stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_atomic_write_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    target = tmp_path / "imgrec.json"
    atomic_write_bytes(target, b"old")

    def crash(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["imgrec.json"]


def test_save_bundle_writes_atomically(saved, monkeypatch):
    import imgrec.bundle as bundle_module

    bundle, model = saved
    written = []
    real = bundle_module.atomic_write_bytes
    monkeypatch.setattr(bundle_module, "atomic_write_bytes",
                        lambda path, data: (written.append(path.name), real(path, data)))
    save_bundle(bundle, model)
    # the weights and their description, each written whole beside the old, then renamed
    assert written == [".model.safetensors.new", ".imgrec.json.new"]
    read_bundle(bundle.path)


@pytest.mark.parametrize("killed_after", [0, 1])
def test_a_run_killed_while_it_replaces_the_weights_leaves_a_bundle_that_reads(tmp_path,
                                                                               monkeypatch,
                                                                               killed_after):
    """kill -9 between writing model.safetensors and imgrec.json left new weights under the
    old description: "its SHA-256 is not the one imgrec.json recorded", until a retrain.
    Both are now written beside the old ones and renamed into place: killed before the
    weights' rename the old bundle is whole (0); between the two renames (1) the pending
    description of the new weights is read."""
    import os

    import torch
    from bundles import make_tiny_bundle

    from imgrec.bundle import read_bundle
    from imgrec.models.registry import build_model
    from imgrec.network import load_model, save_bundle

    path = make_tiny_bundle(tmp_path / "b", export=False)
    old = read_bundle(path)
    old_digest = old.extra["files"]["model.safetensors"]["sha256"]
    torch.manual_seed(1)
    retrained = build_model("fast-cnn", **old.architecture["args"])
    real_replace, calls = os.replace, []

    def killed(src, dst):
        if os.path.basename(src) in (".model.safetensors.new", ".imgrec.json.new"):
            if len(calls) == killed_after:  # the commit's renames: the process dies here
                raise SystemExit("killed")
            calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(SystemExit):
        save_bundle(read_bundle(path), retrained)
    monkeypatch.setattr(os, "replace", real_replace)
    now = read_bundle(path)
    digest = now.extra["files"]["model.safetensors"]["sha256"]
    assert (digest == old_digest) == (killed_after == 0)
    load_model(now)  # the weights there are the ones described
    save_bundle(read_bundle(path), retrained)  # the next run writes over what was left
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []


def test_a_bundle_being_rewritten_is_named_as_such_not_damaged(tmp_path):
    """predict during a training into the same folder said "model.safetensors: ... bytes
    where imgrec.json recorded ... The bundle is damaged": a run holding the folder's lock
    is writing it, and the message now says so (and to retry)."""
    from bundles import make_tiny_bundle

    from imgrec.errors import BundleError
    from imgrec.files import FolderLock

    path = make_tiny_bundle(tmp_path / "b", export=False)
    with open(path / "model.safetensors", "ab") as f:
        f.write(b"the next weights")  # what a reader may see mid-replacement
    held = FolderLock(path, "--out").acquire()
    try:
        with pytest.raises(BundleError) as e:
            read_bundle(path)
        assert "is writing this bundle right now" in str(e.value) and "Retry" in str(e.value)
    finally:
        held.release()
    with pytest.raises(BundleError, match="damaged"):  # nobody writes it: damaged it is
        read_bundle(path)
