"""No error body carries a traceback, a server path or an object's repr: not the corrupt
images (Pillow names the BytesIO it could not read), not a batch's per-image errors, not a
bug in the engine (its message is logged, not sent)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient

from imgrec.serve.app import ServeConfig, create_app
from imgrec.serve.errors import public
from imgrec.serve.uploads import shown_name

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
#: an address (not the "0x15" in "500x1503 pixels"), a repr, a traceback, a source line
LEAKS = [re.compile(p) for p in (r"\b0x[0-9a-fA-F]{6,}", r"object at", r"Traceback",
                                 r'File "', r"<[\w.]+ object")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("errors") / "tiny")


def _assert_clean(text: str, *paths: str) -> None:
    for leak in LEAKS:
        assert not leak.search(text), (leak.pattern, text)
    for path in (sys.prefix, str(ROOT), *paths):
        assert path not in text, (path, text)


_NOISE = random.Random(11)  # fixed noise: a failure can be reproduced
BAD = {
    "png magic, then noise": b"\x89PNG\r\n\x1a\n" + _NOISE.randbytes(500),
    "gif magic, then noise": b"GIF89a" + _NOISE.randbytes(300),
    "truncated jpeg": CHELSEA.read_bytes()[:4000],
    "webp header only": b"RIFF\x10\x00\x00\x00WEBPVP8 " + _NOISE.randbytes(40),
    "tiff header only": b"II*\x00" + _NOISE.randbytes(60),
    "bmp header only": b"BM" + _NOISE.randbytes(60),
}


@pytest.mark.parametrize("name", list(BAD))
def test_corrupt_images_are_reported_without_reprs_or_paths(tiny, name):
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        one = c.post("/v1/predict", content=BAD[name])
        batch = c.post("/v1/predict/batch", files=[("files", ("x.img", BAD[name]))])
    assert 400 <= one.status_code < 500, one.text
    _assert_clean(one.text, str(tiny))
    assert batch.status_code == 200 and "error" in batch.json()["results"][0]
    _assert_clean(batch.text, str(tiny))


def test_a_decoder_message_naming_its_bytesio_is_scrubbed(tiny, monkeypatch):
    """The message Pillow gives for bytes it cannot identify, as the decoder passed it on
    (a 422 used to show `<_io.BytesIO object at 0x...>`)."""
    import imgrec.serve.service as service
    from imgrec.errors import UnreadableImage

    def pillow_says(*args, **kwargs):
        raise UnreadableImage("upload: corrupt or truncated PNG (UnidentifiedImageError: "
                              "cannot identify image file <_io.BytesIO object at "
                              "0x7f3a2c1b9e40>)", "re-export or remove the file")

    monkeypatch.setattr(service, "load_input", pillow_says)
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        one = c.post("/v1/predict", content=CHELSEA.read_bytes())
        batch = c.post("/v1/predict/batch", files=[("files", ("c.jpg", CHELSEA.read_bytes()))])
    assert one.status_code == 422
    assert "cannot identify image file the upload" in one.json()["error"]["message"]
    _assert_clean(one.text)
    _assert_clean(batch.text)
    assert batch.json()["results"][0]["error"]["code"] == "unreadable_image"


def test_a_bug_is_answered_without_its_message(tiny, caplog):
    app = create_app(ServeConfig(model=str(tiny)))
    secret = f"cannot map {tiny}/model.onnx via <Session object at 0x7f00deadbeef>"

    def broken(batch):
        raise RuntimeError(secret)

    with TestClient(app, raise_server_exceptions=False) as c:
        app.state.service.batcher.run = broken
        r = c.post("/v1/predict", content=CHELSEA.read_bytes())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "RuntimeError" in r.json()["error"]["message"]
    _assert_clean(r.text, str(tiny))
    assert secret in caplog.text  # the server's log has it


def test_validation_errors_are_plain(tiny):
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        r = c.post("/v1/predict?top_k=%00%ff", content=CHELSEA.read_bytes())
    assert r.status_code == 422
    _assert_clean(r.text)


def test_public_scrubs_reprs_paths_and_tracebacks():
    text = (f'cannot identify image file <_io.BytesIO object at 0x7f12ab34cd50> in '
            f'{sys.prefix}/lib/x.py\nTraceback (most recent call last):\n  File "a.py", line 3')
    clean = public(text)
    assert clean == "cannot identify image file the upload in <server path>"
    assert public("send the image as multipart field `file`") == \
        "send the image as multipart field `file`"


def test_an_error_names_the_uploaded_file(tiny):
    """A bad image is named by the file name the client sent (it said "upload: not an
    image" for README.md); a raw body is "upload"; a hostile name is shown on one line, cut
    short, and still scrubbed."""
    readme = (ROOT / "README.md").read_bytes()
    with TestClient(create_app(ServeConfig(model=str(tiny)))) as c:
        one = c.post("/v1/predict", files={"file": ("notes.md", readme)})
        raw = c.post("/v1/predict", content=readme)
        batch = c.post("/v1/predict/batch", files=[("files", ("a b.txt", readme)),
                                                   ("files", ("cat.jpg", CHELSEA.read_bytes()))])
        hostile = c.post("/v1/predict", files={"file": ("x\ny" + "z" * 300, readme)})
    assert one.status_code == 415
    assert one.json()["error"]["message"].startswith("notes.md: not an image")
    assert raw.json()["error"]["message"].startswith("upload: not an image")
    bad, good = batch.json()["results"]
    assert bad["filename"] == "a b.txt" and bad["error"]["message"].startswith("a b.txt: not")
    assert "predictions" in good
    message = hostile.json()["error"]["message"]
    assert hostile.status_code == 415 and "\n" not in message
    assert message.startswith("x") and "...: not an image" in message
    assert len(message.split(": not an image")[0]) == 80
    assert shown_name("a\nb\x1bc") == "a\\nb\\x1bc" and shown_name("  ") == "upload"
