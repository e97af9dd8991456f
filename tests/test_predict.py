"""Prediction: the offline ImageNet model on real photos, --json, folders, URLs, per-input
errors, and --invert for MNIST-style bundles."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import numpy as np
import pytest
import torch
from helpers import trained_shapes, truncated_jpeg
from PIL import Image

from imgrec.bundle import Bundle
from imgrec.cli import main
from imgrec.contract import Preprocess
from imgrec.errors import InputError, UnreadableImage
from imgrec.models.registry import build_model
from imgrec.network import save_bundle
from imgrec.predict import Predictor, expand_inputs, fetch_url

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "Persian",
        "Siamese", "tabby cat", "Egyptian Mau"}


def _is_cat(label: str) -> bool:
    return label in CATS or "cat" in label.lower().split(",")[0].split()


@pytest.fixture(scope="module")
def imagenet():
    return Predictor.load("imagenet")


@pytest.mark.slow
def test_imagenet_chelsea_is_a_cat(imagenet, sample_photo):
    (preds,) = imagenet.predict([str(sample_photo("chelsea"))], top_k=5)
    assert _is_cat(preds[0].label), [p.label for p in preds]
    assert len(imagenet.classes) == 1000
    assert preds[0].probability > 0.2


@pytest.mark.slow
def test_imagenet_coffee_is_espresso_or_cup(imagenet, sample_photo):
    (preds,) = imagenet.predict([str(sample_photo("coffee"))], top_k=3)
    top = preds[0].label.lower()
    assert "espresso" in top or "cup" in top, [p.label for p in preds]


@pytest.mark.slow
def test_predict_json_schema_and_error_entry(sample_photo, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    code = main(["predict", str(sample_photo("chelsea")), str(bad), "--json", "--top-k", "3"])
    records = json.loads(capsys.readouterr().out)
    assert code == 0  # one input failed, the other predicted
    assert [r["input"] for r in records] == [str(sample_photo("chelsea")), str(bad)]
    good, err = records
    assert set(good) == {"input", "predictions"} and len(good["predictions"]) == 3
    for p in good["predictions"]:
        assert set(p) == {"label", "index", "probability"}
        assert isinstance(p["label"], str) and isinstance(p["index"], int)
        assert 0 <= p["probability"] <= 1
    probs = [p["probability"] for p in good["predictions"]]
    assert probs == sorted(probs, reverse=True)
    assert set(err) == {"input", "error"} and "not an image" in err["error"]


def test_folders_are_recursive(tmp_path_factory, tmp_path, capsys):
    base = trained_shapes(tmp_path_factory)
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    src = sorted((base / "shapes" / "square").glob("*.png"))
    (root / "top.png").write_bytes(src[0].read_bytes())
    (root / "a" / "b" / "deep.png").write_bytes(src[1].read_bytes())
    (root / "a" / "readme.txt").write_text("not listed")
    assert list(expand_inputs([str(root)])) == [str(root / "a" / "b" / "deep.png"),
                                                 str(root / "top.png")]
    code = main(["predict", "--model", str(base / "bundle"), str(root), "--json"])
    records = json.loads(capsys.readouterr().out)
    assert code == 0 and len(records) == 2
    assert all(r["predictions"][0]["label"] in ("disc", "square") for r in records)
    assert len(records[0]["predictions"]) == 2  # top-k is capped at the class count
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        list(expand_inputs([str(empty)]))


def test_one_source_arrays_and_pil_images_are_predicted(tmp_path_factory):
    """predict("cat.jpg") walked the string letter by letter; an array raised a raw
    TypeError; top_k=0 silently gave one label."""
    base = trained_shapes(tmp_path_factory)
    predictor = Predictor.load(base / "bundle")
    img = sorted((base / "shapes" / "disc").glob("*.png"))[0]
    (one,) = predictor.predict(str(img), top_k=1)
    pixels = np.asarray(Image.open(img).convert("RGB"))
    assert predictor.predict(pixels, top_k=1)[0][0] == one[0]
    assert predictor.predict([Image.open(img)], top_k=1)[0][0] == one[0]
    assert predictor.predict(np.array([str(img), str(img)]), top_k=1)[1][0] == one[0]
    with pytest.raises(InputError, match="top_k"):
        predictor.predict([str(img)], top_k=0)


def test_arrays_are_read_as_train_reads_them_and_bad_items_are_their_own_errors(
        tmp_path_factory):
    """A batch array (N x H x W x C, N x C x H x W) was one item's error for N images, so
    zipping results with labels misaligned; C x H x W and 0..1 floats, which train takes,
    were refused; predict([5]) raised TypeError; a generator had no len(); invert=True and
    top_k=np.int64(2) were ignored and refused."""
    base = trained_shapes(tmp_path_factory)
    predictor = Predictor.load(base / "bundle")
    paths = sorted((base / "shapes" / "disc").glob("*.png"))[:2] + \
        sorted((base / "shapes" / "square").glob("*.png"))[:1]
    hwc = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    expected = [r[0] for r in predictor.predict([str(p) for p in paths], top_k=2)]
    for batch in (hwc, hwc.transpose(0, 3, 1, 2), hwc / 255.0, list(hwc.transpose(0, 3, 1, 2))):
        got = predictor.predict(batch, top_k=np.int64(2))
        assert len(got) == 3 and [r[0].label for r in got] == [e.label for e in expected]
        assert [r[0].probability for r in got] == pytest.approx(
            [e.probability for e in expected], abs=1e-4)
    assert len(predictor.predict(str(p) for p in paths)) == 3  # a generator
    bad = predictor.predict([5, None, hwc[0] * 3.0 - 100, str(paths[0])])
    assert [type(r) for r in bad[:3]] == [InputError] * 3 and isinstance(bad[3], list)
    assert "int" in str(bad[0]) and "0..1 or 0..255" in str(bad[2])
    for wrong in ({"invert": True}, {"invert": "YES"}, {"top_k": True}):
        with pytest.raises(InputError, match="invert|top_k"):
            predictor.predict([str(paths[0])], **wrong)


def test_a_pil_image_opened_from_a_big_jpeg_is_predicted_as_its_file(tmp_path_factory,
                                                                     tmp_path):
    """A file decodes a big JPEG at reduced scale; Image.open(path), not decoded yet, was
    decoded at full size and resized from there: its probabilities differed from the file's
    (1.5e-2 on a 3000 px photo)."""
    base = trained_shapes(tmp_path_factory)
    predictor = Predictor.load(base / "bundle")
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(big)
    by_path = predictor.probabilities(predictor.prepare(str(big))[None])
    by_image = predictor.probabilities(predictor.prepare(Image.open(big))[None])
    np.testing.assert_array_equal(by_image, by_path)
    loaded = Image.open(big)
    loaded.load()  # decoded already: taken as the pixels it holds, still predicted
    assert predictor.predict(loaded, top_k=1)[0][0].label in predictor.classes


def test_pil_images_of_every_mode_bytes_likes_and_exif_orientation(tmp_path_factory,
                                                                    tmp_path):
    """A CMYK (LAB, YCbCr, I, F, RGBX, HSV) PIL image failed the whole call ("cannot write
    mode CMYK as PNG"); a bytearray or memoryview was walked byte by byte; a PIL image of an
    EXIF-rotated file was predicted sideways while its path was upright."""
    base = trained_shapes(tmp_path_factory)
    predictor = Predictor.load(base / "bundle")
    img = sorted((base / "shapes" / "disc").glob("*.png"))[0]
    probs = predictor.probabilities(predictor.prepare(str(img))[None])[0]
    rgb = Image.open(img).convert("RGB")
    for mode in ("CMYK", "LAB", "YCbCr", "RGBX", "HSV", "I", "F"):
        (preds,) = predictor.predict(rgb.convert(mode), top_k=1)
        assert isinstance(preds, list), (mode, preds)
    (cmyk,) = predictor.predict(rgb.convert("CMYK"), top_k=2)
    assert cmyk[0].probability == pytest.approx(probs.max(), abs=0.02)
    data = img.read_bytes()
    for wrapped in (bytearray(data), memoryview(data)):
        (preds,) = predictor.predict(wrapped, top_k=1)
        assert preds[0].probability == pytest.approx(probs.max(), abs=1e-6)
    # a landscape photo stored as portrait with EXIF orientation 6 (rotate 90 on display)
    upright = Image.open(img).convert("RGB").resize((64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(stored, exif=exif, quality=95)
    by_path = predictor.prepare(str(stored))
    assert np.array_equal(predictor.prepare(Image.open(stored)), by_path)


def test_a_url_is_cut_off_at_its_deadline_and_a_redirect_loop_is_one_line():
    """urlopen's timeout bounds each read: a server sending a byte every 0.2 s was waited on
    for ever. The download has one deadline. A redirect loop's message (three lines from
    urllib) is one line."""
    import time

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError, match="took over 1 s"):
            fetch_url(f"{base}/drip", timeout=1.0)
        assert time.monotonic() - t0 < 3
        with pytest.raises(InputError) as e:
            fetch_url(f"{base}/loop")
        assert "\n" not in str(e.value) and "cannot fetch" in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www (no network needed)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_input(tmp_path_factory, http_folder, capsys):
    base = trained_shapes(tmp_path_factory)
    www, url = http_folder
    img = sorted((base / "shapes" / "disc").glob("*.png"))[0]
    (www / "disc.png").write_bytes(img.read_bytes())
    (www / "page.html").write_text("<html>hello</html>")
    predictor = Predictor.load(base / "bundle")
    from_url, from_file, html, missing = predictor.predict(
        [f"{url}/disc.png", str(img), f"{url}/page.html", f"{url}/nothing.png"], top_k=2)
    assert [p.label for p in from_url] == [p.label for p in from_file]
    assert from_url[0].probability == pytest.approx(from_file[0].probability, abs=1e-6)
    assert isinstance(html, UnreadableImage)
    assert isinstance(missing, InputError) and "404" in str(missing)
    with pytest.raises(InputError, match="cap"):
        fetch_url(f"{url}/disc.png", max_bytes=10)
    assert str(html).startswith(f"{url}/page.html: not an image")  # named by its URL
    code = main(["predict", "--model", str(base / "bundle"), f"{url}/disc.png", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)[0]["input"] == f"{url}/disc.png"
    # an address as a browser shows it: spaces and non-ASCII letters in the path, and the
    # scheme in capitals (urllib refused the first two; the third was read as a file path)
    (www / "ünï 猫.png").write_bytes(img.read_bytes())
    for address in (f"{url}/ünï 猫.png", f"{url}/%C3%BCn%C3%AF%20%E7%8C%AB.png",
                    f"HTTP://{url.removeprefix('http://')}/disc.png"):
        (preds,) = predictor.predict(address, top_k=1)
        assert isinstance(preds, list), preds
        assert preds[0].probability == pytest.approx(from_file[0].probability, abs=1e-6)


@pytest.fixture
def mnist_style_bundle(tmp_path):
    torch.manual_seed(0)
    model = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=28, width=8)
    contract = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto")
    bundle = Bundle(tmp_path / "digits", {"name": "fast-cnn", "args": {
        "in_channels": 1, "num_classes": 10, "image_size": 28, "width": 8}},
        [str(i) for i in range(10)], contract)
    return save_bundle(bundle, model)


def test_invert_on_mnist_style_bundle(mnist_style_bundle, tmp_path, capsys):
    arr = np.full((28, 28), 235, np.uint8)  # a dark-on-light "photo" of a digit
    arr[5:23, 12:16] = 15
    photo = tmp_path / "photo.png"
    Image.fromarray(arr).save(photo)
    flipped = tmp_path / "flipped.png"
    Image.fromarray(255 - arr).save(flipped)

    def probs(path, *flags):
        assert main(["predict", "--model", str(mnist_style_bundle.path), str(path), "--json",
                     "--top-k", "10", *flags]) == 0
        preds = json.loads(capsys.readouterr().out)[0]["predictions"]
        return {p["label"]: p["probability"] for p in preds}

    inverted = probs(photo, "--invert", "yes")
    reference = probs(flipped, "--invert", "no")
    auto = probs(photo)  # the bundle's contract says auto: a light border is inverted
    raw = probs(photo, "--invert", "no")
    for label in reference:
        assert inverted[label] == pytest.approx(reference[label], abs=1e-5)
        assert auto[label] == pytest.approx(reference[label], abs=1e-5)
    assert any(abs(raw[k] - reference[k]) > 1e-4 for k in reference)


def test_predict_truncated_only_input_fails(tmp_path_factory, tmp_path, capsys):
    base = trained_shapes(tmp_path_factory)
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    assert main(["predict", "--model", str(base / "bundle"), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: error: ")
    assert "cut.jpg" in err[0] and "truncated" in err[0]
