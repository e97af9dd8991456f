"""`imgrec serve`: the JSON API, its limits and error schema, micro-batching, metrics, and the
proof that the serve path never imports torch."""

from __future__ import annotations

import functools
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundles import CLASSES, make_tiny_bundle
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from servers import NO_TORCH, free_port, wait_healthy

from imgrec.serve.app import ServeConfig, create_app
from imgrec.serve.batching import MicroBatcher

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        yield c


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A 100-byte PNG whose header announces width x height pixels (a decompression bomb
    needs no real pixel data to be refused: the limit is checked on the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _photo() -> Image.Image:
    return Image.open(CHELSEA).convert("RGB")


@functools.cache
def corpus() -> dict[str, tuple[bytes, str, int, str | None]]:
    """name -> (bytes, filename, expected status, expected error code)."""
    photo = _photo()
    jpeg = CHELSEA.read_bytes()
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)  # I;16
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "empty": (b"", "empty.jpg", 400, "bad_input"),
        "text": (b"hello, this is not an image\n" * 20, "notes.txt", 415,
                 "unsupported_media_type"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "half.jpg", 422, "unreadable_image"),
        "garbage_after_png_magic": (b"\x89PNG\r\n\x1a\n" + os.urandom(500), "x.png", 422,
                                    "unreadable_image"),
        "random_30mb": (os.urandom(30 * 1024 * 1024), "noise.jpg", 413, "upload_too_large"),
        "png_bomb_30000x30000": (_png_bomb(), "bomb.png", 413, "image_too_large"),
        "png_named_jpg": (_png(photo), "photo.jpg", 200, None),
        "cmyk_jpeg": (_jpeg(photo.convert("CMYK")), "cmyk.jpg", 200, None),
        "png_16bit": (_png(grey16), "deep.png", 200, None),
        "animated_gif": (_animated_gif(), "anim.gif", 200, None),
        "rgba_png": (_png(rgba), "alpha.png", 200, None),
    }


CORPUS_NAMES = ["empty", "text", "truncated_jpeg", "garbage_after_png_magic", "random_30mb",
                "png_bomb_30000x30000", "png_named_jpg", "cmyk_jpeg", "png_16bit", "animated_gif",
                "rgba_png"]


def _assert_predictions(body: dict, k: int = 3) -> None:
    assert body["model"] == "tiny-shapes"
    preds = body["predictions"]
    assert len(preds) == k
    assert {p["label"] for p in preds} <= set(CLASSES)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0001
    assert all(CLASSES[p["index"]] == p["label"] for p in preds)
    assert body["elapsed_ms"] >= 0


def _assert_error(r: httpx.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    assert body["error"]["message"]


# -- the bad-upload corpus ----------------------------------------------------------------
@pytest.mark.parametrize("name", CORPUS_NAMES)
@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_upload_corpus(client, name, how):
    data, filename, status, code = corpus()[name]
    if how == "multipart":
        r = client.post("/v1/predict", files={"file": (filename, data, "image/jpeg")})
    else:  # a lying content type: the bytes decide
        r = client.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
    if status == 200:
        assert r.status_code == 200, r.text
        _assert_predictions(r.json())
    else:
        _assert_error(r, status, code)
    assert client.get("/healthz").json()["status"] == "ok"


def test_upload_limit_answers_before_reading_the_body(tiny):
    """A body announced over the limit gets 413 without a single receive()."""
    app = create_app(ServeConfig(model=str(tiny)))
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-length", str(30 * 1024 * 1024).encode()),
                         (b"content-type", b"image/jpeg")]}
    import anyio

    anyio.run(app, scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b"upload_too_large" in sent[1]["body"]


def test_chunked_upload_is_counted_while_streaming(client):
    def chunks():
        for _ in range(30):
            yield b"\xff\xd8\xff" + b"\x00" * (1024 * 1024)

    _assert_error(client.post("/v1/predict", content=chunks()), 413, "upload_too_large")
    assert client.get("/healthz").status_code == 200


def test_upload_limit_is_configurable(tiny):
    jpeg = CHELSEA.read_bytes()
    assert len(jpeg) > 20_000
    with TestClient(create_app(ServeConfig(model=str(tiny), max_upload_mb=0.01))) as c:
        _assert_error(c.post("/v1/predict", content=jpeg), 413, "upload_too_large")
        small = _jpeg(_photo().resize((64, 48)))
        assert c.post("/v1/predict", content=small).status_code == 200


# -- the API ------------------------------------------------------------------------------
def test_predict_top_k(client):
    jpeg = CHELSEA.read_bytes()
    r = client.post("/v1/predict?top_k=2", files={"file": ("c.jpg", jpeg)})
    assert r.status_code == 200
    _assert_predictions(r.json(), k=2)
    r = client.post("/v1/predict?top_k=10", content=jpeg)  # more than there are classes
    _assert_predictions(r.json(), k=3)
    for bad in ("0", "-1", "1001", "many"):
        _assert_error(client.post(f"/v1/predict?top_k={bad}", content=jpeg), 422,
                      "invalid_request")


def test_predict_needs_the_file_field(client):
    r = client.post("/v1/predict", files={"image": ("c.jpg", CHELSEA.read_bytes())})
    _assert_error(r, 400, "bad_input")
    assert "`file`" in r.json()["error"]["message"]
    r = client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("a", b"b")})
    _assert_error(r, 400, None)
    r = client.post("/v1/predict", files=[("file", ("a.jpg", b"1")), ("file", ("b.jpg", b"2"))])
    _assert_error(r, 400, "bad_input")


def test_batch_endpoint_answers_each_file(client):
    files = [("files", ("cat.jpg", CHELSEA.read_bytes(), "image/jpeg")),
             ("files", ("notes.txt", b"plain text", "text/plain")),
             ("files", ("alpha.png", corpus()["rgba_png"][0], "image/png"))]
    r = client.post("/v1/predict/batch?top_k=1", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["cat.jpg", "notes.txt", "alpha.png"]
    assert len(results[0]["predictions"]) == 1 and len(results[2]["predictions"]) == 1
    assert results[1]["error"]["code"] == "unsupported_media_type"
    _assert_error(client.post("/v1/predict/batch", content=CHELSEA.read_bytes()), 400,
                  "bad_input")
    texted = client.post("/v1/predict/batch", files=[
        ("files", ("cat.jpg", CHELSEA.read_bytes(), "image/jpeg"))], data={"files": "text"})
    _assert_error(texted, 400, "bad_input")
    assert "the `files` field must be a file upload" in texted.json()["error"]["message"]


def test_model_health_and_errors(client):
    info = client.get("/v1/model").json()
    assert info["model"] == "tiny-shapes" and info["classes"] == 3 and info["labels"] == CLASSES
    assert info["input_size"] == 32 and info["channels"] == 3
    assert info["engine"] == "onnxruntime" and info["onnx_file"] == "model.onnx"
    assert 1 <= info["engine_threads"] <= (os.cpu_count() or 1)
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny-shapes"}
    _assert_error(client.get("/no/such/page"), 404, "not_found")
    _assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_metrics_are_prometheus_text(client):
    client.post("/v1/predict", content=CHELSEA.read_bytes())
    client.post("/v1/predict", content=b"not an image")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'imgrec_requests_total{endpoint="/v1/predict",method="POST",status="200"}' in text
    assert 'imgrec_request_latency_seconds_bucket{endpoint="/v1/predict",le="0.1"}' in text
    assert "imgrec_batch_size_count" in text and "imgrec_inference_seconds_sum" in text
    assert 'imgrec_errors_total{code="unsupported_media_type"}' in text


def test_page_docs_and_static_files_need_no_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text
    assert "https://" not in page.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text
    assert client.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_concurrent_requests_are_batched(tiny):
    """With a 50 ms window, concurrent requests share inference batches."""
    cfg = ServeConfig(model=str(tiny), max_batch=8, max_wait_ms=50)
    jpeg = CHELSEA.read_bytes()
    with TestClient(create_app(cfg)) as c, ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: c.post("/v1/predict", content=jpeg).status_code,
                              range(24)))
        assert codes == [200] * 24
        text = c.get("/metrics").text
    count = float(next(x.split()[-1] for x in text.splitlines()
                       if x.startswith("imgrec_batch_size_count")))
    assert count < 24  # some requests shared a batch


# -- the micro-batcher on its own -----------------------------------------------------------
def test_batcher_coalesces_and_respects_max_batch():
    sizes: list[int] = []
    gate = threading.Event()

    def run(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return x.reshape(len(x), -1).sum(1, keepdims=True).astype(np.float32)

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=20, on_batch=lambda n, s: sizes.append(n))
    try:
        first = batcher.submit(np.ones((1, 2, 2), np.uint8))
        time.sleep(0.1)  # the first batch is now held in run() by the gate
        rest = [batcher.submit(np.full((1, 2, 2), i, np.uint8)) for i in range(9)]
        gate.set()
        assert first.result(5)[0] == 4
        assert [f.result(5)[0] for f in rest] == [4 * i for i in range(9)]
    finally:
        batcher.close()
    assert sizes[0] == 1 and max(sizes) == 4 and sum(sizes) == 10 and len(sizes) <= 5
    with pytest.raises(RuntimeError):
        batcher.submit(np.ones((1, 2, 2), np.uint8))


def test_batcher_passes_engine_errors_to_every_waiter():
    def run(x):
        raise ValueError("engine broke")

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=1)
    try:
        with pytest.raises(ValueError, match="engine broke"):
            batcher.submit(np.ones((1, 2, 2), np.uint8)).result(5)
        assert batcher.alive
    finally:
        batcher.close()


# -- the real server, with torch made unimportable -----------------------------------------
def test_serve_cli_runs_without_torch_and_shuts_down_gracefully(tiny):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "serve", str(tiny), "--port", str(port),
         "--max-wait-ms", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        jpeg = CHELSEA.read_bytes()
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda _: httpx.post(f"{base}/v1/predict", content=jpeg,
                                                    timeout=30), range(8)))
        assert [r.status_code for r in rs] == [200] * 8
        _assert_predictions(rs[0].json())
        big = httpx.post(f"{base}/v1/predict", content=os.urandom(11 * 1024 * 1024), timeout=30)
        _assert_error(big, 413, "upload_too_large")
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "TORCH-IMPORT-ATTEMPT" not in err
    # uvicorn finishes in-flight requests and the lifespan; the SIGTERM it re-raises then
    # reaches serve's handler, and the process exits 0
    assert proc.returncode == 0, err
    assert "Application shutdown complete" in err
    assert f"http://localhost:{port}/" in out
    assert "Finished server process" in err


# -- the real ImageNet model ----------------------------------------------------------------
@pytest.mark.slow
def test_imagenet_model_sees_a_cat(sample_photo):
    from imgrec.export import ensure_onnx

    ensure_onnx("imagenet")  # exports once per test session (needs torch; serving does not)
    with TestClient(create_app(ServeConfig(model="imagenet"))) as c:
        info = c.get("/v1/model").json()
        assert info["classes"] == 1000 and info["input_size"] == 224
        photo = sample_photo("chelsea").read_bytes()
        r = c.post("/v1/predict?top_k=3", files={"file": ("chelsea.jpg", photo, "image/jpeg")})
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]
    assert "cat" in top["label"].lower() and top["probability"] > 0.2


def test_corpus_is_what_it_says():
    c = corpus()
    assert sorted(c) == sorted(CORPUS_NAMES)
    assert Image.open(io.BytesIO(c["png_16bit"][0])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(c["cmyk_jpeg"][0])).mode == "CMYK"
    assert Image.open(io.BytesIO(c["rgba_png"][0])).mode == "RGBA"
    assert getattr(Image.open(io.BytesIO(c["animated_gif"][0])), "n_frames", 1) == 3
    assert Image.open(io.BytesIO(c["png_named_jpg"][0])).format == "PNG"
    # the header alone, read by the PNG plugin: Image.open would refuse the bomb itself
    bomb = PngImagePlugin.PngImageFile(io.BytesIO(c["png_bomb_30000x30000"][0]))
    assert bomb.size == (30000, 30000)
    assert len(c["png_bomb_30000x30000"][0]) < 200 and len(c["random_30mb"][0]) == 30 << 20


def test_serve_extra_is_enough_and_torch_free():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
                .lower() for r in reqs}

    base = names(project["dependencies"])
    serve = names(project["optional-dependencies"]["serve"])
    assert {"onnxruntime", "fastapi", "uvicorn", "python-multipart", "pillow", "numpy"} <= serve
    assert not ({"torch", "torchvision", "timm"} & (base | serve))


def test_batcher_lanes_run_batches_side_by_side():
    """Each engine of a list gets its own inference thread, all fed from one queue: a batch
    here only finishes when another lane runs one at the same time."""
    together = threading.Barrier(2, timeout=5)

    def run(batch: np.ndarray) -> np.ndarray:
        together.wait()
        return batch.reshape(len(batch), -1)[:, :1].astype(np.float32)

    batcher = MicroBatcher([run, run], max_batch=1, max_wait_ms=0)
    assert batcher.lanes == 2 and batcher.alive
    futures = [batcher.submit(np.full((1, 2, 2), i, np.uint8)) for i in range(4)]
    assert [float(f.result(5)[0]) for f in futures] == [0.0, 1.0, 2.0, 3.0]
    batcher.close()
    assert not batcher.alive


def test_serve_config_lanes():
    config = ServeConfig(threads=2)
    assert (config.engine_lanes, config.lane_threads) == (2, 1)
    config = ServeConfig(threads=8, lanes=2)
    assert (config.engine_lanes, config.lane_threads) == (2, 4)
    assert ServeConfig(threads=1, lanes=3).engine_lanes == 1
