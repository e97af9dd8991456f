"""int8 end to end on a tiny bundle: calibration from the bundle's own training data (else the
sample photos, said so), `predict --int8` and `serve --int8` (and their one-line errors), and
`imgrec benchmark`'s table, JSON and chart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient

from imgrec.bundle import read_bundle, serving_onnx_path
from imgrec.cli import main
from imgrec.export import (
    CALIBRATION_VIEWS,
    ONNX_INT8_FILE,
    bias_correct,
    calibration_data,
    export_bundle,
    float_nodes,
    offline_photos,
    photo_views,
)
from imgrec.predict import Predictor
from imgrec.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("int8") / "tiny", int8=True)


def test_calibration_uses_the_training_data_and_holds_images_out(tmp_path, shapes):
    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    bundle = read_bundle(path)
    bundle.training = {"data": str(shapes), "val_fraction": 0.2, "test_fraction": 0.1,
                       "seed": 0}
    bundle.write_meta()
    cal = calibration_data(read_bundle(path))
    assert "training images of" in cal.source and cal.held_out is not None
    assert cal.pixels.shape[1:] == (3, 32, 32) and cal.pixels.dtype == np.uint8
    # no held-out image is a calibration image
    flat = {p.tobytes() for p in cal.pixels}
    assert not any(p.tobytes() in flat for p in cal.held_out)

    r = export_bundle(path, int8=True)
    assert r.int8_held_out and r.int8_agreement_images == len(cal.held_out)
    assert 0.0 <= r.int8_top1_agreement <= 1.0
    info = read_bundle(path).extra["export"]
    assert info["int8_calibration"] == r.int8_calibration and info["int8_held_out"] is True
    # serving stays float32 unless asked: the int8 file is opt-in
    assert info["serve"] == "model.onnx" and serving_onnx_path(read_bundle(path)).name == \
        "model.onnx"


def test_calibration_falls_back_to_the_sample_photos_and_says_so(tmp_path):
    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    bundle = read_bundle(path)
    bundle.training = {"data": str(tmp_path / "gone")}
    cal = calibration_data(bundle)
    assert cal.held_out is None and "views" in cal.source and "gone" in cal.source
    photos = offline_photos()
    assert len(cal.pixels) == len(photos) * CALIBRATION_VIEWS
    assert cal.pixels.shape[1:] == (3, 32, 32) and cal.pixels.dtype == np.uint8


def test_a_wrong_calibration_path_is_one_line_exit_2(tmp_path, capsys):
    """A dataset the user names with --calibration must exist: no quiet fallback to photos."""
    path = make_tiny_bundle(tmp_path / "tiny", export=False)
    assert main(["export", str(path), "--int8", "--calibration", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration" in err[0] and "nope" in err[0]
    assert not (path / "model.int8.onnx").exists()


def test_photo_views_are_distinct_framings_and_repeatable(sample_photo):
    from imgrec.contract import Preprocess

    contract = Preprocess(input_size=32, channels=3, resize="shorter", resize_to=36)
    views = photo_views(contract, [sample_photo("chelsea")], per_photo=6, seed=1)
    assert views.shape == (6, 3, 32, 32)
    assert np.array_equal(views[1], views[0][..., ::-1].copy()) or \
        np.abs(views[1].astype(int) - views[0][..., ::-1]).max() <= 1  # the mirror
    assert len({v.tobytes() for v in views}) == 6  # every crop differs
    assert np.array_equal(views, photo_views(contract, [sample_photo("chelsea")], 6, seed=1))


def test_float_nodes_can_keep_the_depthwise_convolutions(tmp_path):
    import onnx
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 2))
    path = tmp_path / "m.onnx"
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 8, 8), str(path), dynamo=False)
    graph = onnx.load(str(path)).graph.node
    convs = [n.name for n in graph if n.op_type == "Conv"]
    assert convs[1] not in float_nodes(path, first_convs=0, depthwise=False)
    kept = float_nodes(path, first_convs=0, depthwise=True)
    assert convs[1] in kept and convs[0] not in kept and convs[2] not in kept
    assert any(n.op_type == "Clip" and n.name in kept for n in graph)


def test_bias_correction_puts_weights_on_the_int8_grid_and_keeps_the_output_means(tmp_path):
    """Rounded to ONNX Runtime's per-channel int8 grid, with the rounding's mean effect taken
    out of the bias: each output channel's mean over the calibration images stays float32's
    (a plain rounding moves it), and a node kept in float32 is left alone."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 16, 3, groups=4),
                              torch.nn.Conv2d(16, 4, 1))
    path = tmp_path / "m.onnx"
    torch.onnx.export(net.eval(), torch.zeros(1, 4, 12, 12), str(path), input_names=["input"],
                      dynamic_axes={"input": {0: "n"}}, dynamo=False)
    x = (np.random.default_rng(0).random((24, 4, 12, 12)) * 3 + 1).astype(np.float32)

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]

    before = run(path)
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert bias_correct(path, x, keep=[convs[2].name]) == 2
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for conv in convs[:2]:
        w = after[conv.input[1]].reshape(len(after[conv.input[1]]), -1)
        steps = w / (np.abs(w).max(1, keepdims=True) / 127)
        assert np.abs(steps - np.round(steps)).max() < 1e-3  # exactly on the grid
    assert np.array_equal(after[convs[2].input[1]], weights[convs[2].input[1]])
    moved = np.abs(run(path).mean((0, 2, 3)) - before.mean((0, 2, 3))).max()
    assert moved < 1e-3 * np.abs(before).mean()
    # without the bias correction the same rounding moves the means far more
    for conv in convs[:2]:
        w = weights[conv.input[1]]
        scale = np.abs(w).reshape(len(w), -1).max(1).reshape(-1, 1, 1, 1) / 127
        weights[conv.input[1]] = (np.round(w / scale) * scale).astype(np.float32)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    onnx.save(model, str(tmp_path / "rounded.onnx"))
    rounded = np.abs(run(tmp_path / "rounded.onnx").mean((0, 2, 3)) - before.mean((0, 2, 3)))
    assert rounded.max() > 10 * moved, (rounded.max(), moved)


def test_float_nodes_keep_the_first_convolutions_and_the_classifier(tiny_int8):
    import onnx

    nodes = float_nodes(tiny_int8 / "model.onnx", first_convs=1)
    graph = onnx.load(str(tiny_int8 / "model.onnx")).graph.node
    first_conv = next(n.name for n in graph if n.op_type == "Conv")
    last_gemm = [n.name for n in graph if n.op_type in ("Gemm", "MatMul")][-1]
    assert nodes[0] == first_conv and nodes[-1] == last_gemm


def test_predict_int8_runs_the_int8_file(tiny_int8, sample_photo, capsys):
    p = Predictor.load(tiny_int8, engine="int8")
    assert p.engine.path.name == ONNX_INT8_FILE
    assert main(["predict", str(sample_photo("chelsea")), "--model", str(tiny_int8), "--int8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["predictions"]) == 3


def test_int8_without_the_file_is_one_line_exit_2(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "tiny")
    for argv in (["predict", "--model", str(path), "--int8"],
                 ["serve", str(path), "--int8", "--port", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgrec: error:") and err.count("\n") == 1
        assert f"imgrec export {path} --int8" in err
    assert main(["predict", "--model", str(path), "--int8", "--engine", "torch"]) == 2
    assert "--int8" in capsys.readouterr().err


def test_serve_int8_serves_the_int8_file(tiny_int8, sample_photo):
    with TestClient(create_app(ServeConfig(model=str(tiny_int8), int8=True))) as c:
        assert c.get("/v1/model").json()["onnx_file"] == ONNX_INT8_FILE
        r = c.post("/v1/predict", content=sample_photo("chelsea").read_bytes())
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3
    with TestClient(create_app(ServeConfig(model=str(tiny_int8)))) as c:
        assert c.get("/v1/model").json()["onnx_file"] == "model.onnx"


def test_benchmark_command_writes_table_json_and_chart(tiny_int8, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", str(tiny_int8), "--seconds", "0.2", "--batch-sizes", "1,4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime int8" in printed and "images/s" in printed
    result = json.loads((out / "benchmark.json").read_text())
    got = {(m["engine"], m["batch_size"]) for m in result["measurements"]}
    assert got == {(e, b) for e in ("torch", "onnx", "int8") for b in (1, 4)}
    assert all(m["images_per_s"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0
               for m in result["measurements"])
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith("benchmark") for p in tiny_int8.iterdir())


def test_benchmark_notes_missing_engines_and_refuses_bad_options(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "tiny")  # model.onnx, no int8 file
    assert main(["benchmark", str(path), "--seconds", "0.05", "--batch-sizes", "2",
                 "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime int8 skipped" in printed and "--int8" in printed
    (path / "model.safetensors").unlink()  # a serve-only copy: ONNX Runtime is still timed
    assert main(["benchmark", str(path), "--seconds", "0.05", "--batch-sizes", "2",
                 "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "model.safetensors is missing" in printed
    assert {m["engine"] for m in json.loads((tmp_path / "c" / "benchmark.json").read_text())[
        "measurements"]} == {"onnx"}
    import importlib.util

    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:  # a serve-only install: the table and JSON, no PNG
        mp.setattr(importlib.util, "find_spec",
                   lambda name, *a: None if name == "matplotlib" else real(name, *a))
        assert main(["benchmark", str(path), "--seconds", "0.05", "--batch-sizes", "2",
                     "--out", str(tmp_path / "d")]) == 0
    assert "chart:   none (the chart needs matplotlib" in capsys.readouterr().out
    assert (tmp_path / "d" / "benchmark.json").is_file()
    assert not (tmp_path / "d" / "benchmark.png").exists()
    for argv, needle in ((["--out", str(path / "inside")], "inside the bundle"),
                         (["--batch-sizes", "1,x"], "--batch-sizes"),
                         (["--batch-sizes", "0"], "from 1 to 4096")):
        assert main(["benchmark", str(path), "--seconds", "0.05", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_quantizing_on_a_full_disk_says_so_and_leaves_nothing(tiny_int8, tmp_path,
                                                               monkeypatch):
    """A full disk made the quantizer read back a truncated model: "int8 quantization failed
    (DecodeError: ... Wire format was corrupt). Serve the float32 model.onnx instead", with
    its shape-inferred copy left in the bundle. It is now named as a want of space."""
    import shutil
    from collections import namedtuple

    import onnxruntime.quantization as q

    from imgrec.errors import InputError
    from imgrec.export import quantize_int8

    src = tmp_path / "model.onnx"
    shutil.copy(tiny_int8 / "model.onnx", src)

    def truncated(model_input, *args, **kwargs):
        inferred = Path(model_input).with_name(f"{Path(model_input).stem}-inferred.onnx")
        inferred.write_bytes(b"truncated")  # what the quantizer had written when space ran out
        raise RuntimeError("Error parsing message with type 'onnx.ModelProto'")

    monkeypatch.setattr(q, "quantize_static", truncated)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    calibration = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(InputError, match="too little free disk space to quantize"):
        quantize_int8(src, tmp_path / "model.int8.onnx", calibration, bias_correction=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_int8_run_says_int8(tiny_int8, tmp_path):
    """evaluate's JSON, predict's --out job record and Ray's actors read the engine's name:
    an int8 run was recorded as "onnx" beside the file model.int8.onnx."""
    from imgrec.batch_predict import job_record

    int8 = Predictor.load(str(tiny_int8), engine="int8")
    assert int8.engine.name == "int8"
    assert Predictor.load(str(tiny_int8), engine="onnx").engine.name == "onnx"
    record = job_record(int8, None, 3, None)
    assert record["engine"] == "int8" and record["model"]["file"] == ONNX_INT8_FILE


def test_benchmark_says_when_the_machine_was_busy(monkeypatch):
    import os

    from imgrec import benchmarking

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.4, 0.4))
    assert benchmarking.busy_note() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (4.2, 3.0, 2.0))
    assert "busy (load average 4.2 on 2 CPUs)" in benchmarking.busy_note()
