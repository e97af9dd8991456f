"""The preprocessing contract: sizes, normalisation on NumPy and torch, invert, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.contract import Preprocess, fit_arrays, load_input
from imgrec.errors import BundleError


def _gradient(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr)


def test_squash_keeps_whole_image():
    c = Preprocess(input_size=16, resize="squash")
    out = c.to_uint8(_gradient(64, 32))
    assert out.shape == (3, 16, 16)
    # The whole width is kept: the red ramp still runs from ~0 to ~255.
    assert out[0, 8, 0] < 20 and out[0, 8, -1] > 235


def test_shorter_then_centre_crop():
    c = Preprocess(input_size=16, resize="shorter", resize_to=20)
    out = c.to_uint8(_gradient(80, 40))  # -> 40x20 -> crop centre 16x16
    assert out.shape == (3, 16, 16)
    # Cropping drops both ends of the ramp: no near-black or near-white column survives.
    assert 60 < out[0, 8, 0] < 128 < out[0, 8, -1] < 200


def test_shorter_on_tall_image_and_small_image():
    c = Preprocess(input_size=8, resize="shorter", resize_to=10)
    assert c.to_uint8(_gradient(10, 50)).shape == (3, 8, 8)
    assert c.to_uint8(_gradient(3, 3)).shape == (3, 8, 8)  # upscaled, never a short crop


def test_normalize_numpy_and_torch_identical():
    c = Preprocess(input_size=4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    a = c.normalize(batch)
    b = c.normalize(torch.from_numpy(batch))
    assert a.dtype == np.float32 and b.dtype == torch.float32
    np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a[0, 0, 0, 0], (batch[0, 0, 0, 0] / 255 - 0.485) / 0.229,
                               atol=1e-5)


def test_normalize_numpy_is_the_plain_formula_bit_for_bit():
    """The in-place NumPy path (one float32 array, no temporaries) gives exactly the bits of
    the plain (x - mean) / std, so models trained before it score images alike; it leaves
    the input as it was and takes float input too."""
    c = Preprocess(input_size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = np.random.default_rng(1).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    before = batch.copy()
    mean = np.asarray(c.mean, np.float32).reshape(1, -1, 1, 1) * 255.0
    std = np.asarray(c.std, np.float32).reshape(1, -1, 1, 1) * 255.0
    expected = (batch.astype(np.float32) - mean) / std
    got = c.normalize(batch)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.array_equal(batch, before)
    assert np.array_equal(c.normalize(batch.astype(np.float64)), expected)


def test_call_gives_float_chw():
    c = Preprocess(input_size=6, channels=1, mean=(0.5,), std=(0.5,))
    out = c(Image.new("L", (12, 12), 255))
    assert out.shape == (1, 6, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def _digit(dark_on_light: bool) -> Image.Image:
    arr = np.full((28, 28), 240 if dark_on_light else 10, np.uint8)
    arr[6:22, 12:16] = 20 if dark_on_light else 250  # a "1"
    return Image.fromarray(arr, "L")


def test_invert_auto_on_dark_on_light_digit():
    c = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto")
    photo = c.to_uint8(_digit(dark_on_light=True))
    mnist_like = c.to_uint8(_digit(dark_on_light=False))
    # The photo is inverted to light-on-dark; an MNIST-style image is left alone.
    assert photo[0, 0, 0] == 255 - 240 and photo[0, 10, 13] == 255 - 20
    assert mnist_like[0, 0, 0] == 10 and mnist_like[0, 10, 13] == 250
    # Explicit settings win over the contract's.
    assert c.to_uint8(_digit(True), invert="no")[0, 0, 0] == 240
    assert c.to_uint8(_digit(False), invert="yes")[0, 0, 0] == 245


def test_to_dict_from_dict_round_trip():
    c = Preprocess(input_size=224, channels=3, resize="shorter", resize_to=256,
                   interpolation="bicubic", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                   invert="auto")
    d = c.to_dict()
    assert d["mean"] == [0.1, 0.2, 0.3] and d["resize_to"] == 256
    import json

    assert Preprocess.from_dict(json.loads(json.dumps(d))) == c
    assert Preprocess.from_dict({**d, "future_key": 1}) == c  # newer keys are ignored
    assert c.replace(invert="no").invert == "no"


@pytest.mark.parametrize("bad", [
    {"input_size": 8, "channels": 2},
    {"input_size": 8, "channels": 1},  # mean/std have three values
    {"input_size": 8, "interpolation": "magic"},
])
def test_invalid_contract(bad):
    with pytest.raises(BundleError):
        Preprocess(**bad)


def test_load_input_decodes_and_applies(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (30, 10), (255, 0, 0)).save(path)
    c = Preprocess(input_size=8, channels=1, mean=(0.5,), std=(0.5,))
    out = load_input(path, c)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 76) <= 2  # luma of pure red


def test_fit_arrays_resizes_and_passes_through():
    c = Preprocess(input_size=8, channels=1, mean=(0.5,), std=(0.5,))
    same = np.zeros((2, 1, 8, 8), np.uint8)
    assert fit_arrays(same, c) is same
    big = np.full((3, 1, 16, 16), 200, np.uint8)
    out = fit_arrays(big, c)
    assert out.shape == (3, 1, 8, 8) and np.all(out == 200)


@pytest.mark.parametrize("size, fmt", [((640, 480), "WEBP"), ((3000, 1000), "PNG"),
                                       ((1800, 2400), "TIFF")])
def test_bounded_decoding_leaves_ordinary_images_as_they_were(size, fmt):
    """The decoder's memory bounds (issue 11) change no pixel of an ordinary image: load_input
    gives what decoding it whole with Pillow and applying the contract gives."""
    import io

    from imgrec.contract import lite_contract

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1] // 50 + 1, size[0] // 50 + 1, 3), np.uint8)
    img = Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    whole = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    for contract in (lite_contract(224, 256), Preprocess(32, 3),
                     Preprocess(28, 1, mean=(0.5,), std=(0.5,))):
        expected = contract.to_uint8(whole if contract.channels == 3 else whole.convert("L"))
        assert np.array_equal(load_input(buf.getvalue(), contract), expected)


@pytest.mark.parametrize("size", [(447, 350), (300, 500), (257, 256), (1000, 301)])
def test_crop_box_resize_matches_resize_then_crop(size):
    """resize_image resamples only the centre crop's box: the pixels of resizing the whole
    image and then cropping, to within rounding (at most two levels)."""
    rng = np.random.default_rng(0)
    w, h = size
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), np.uint8))
                        .resize((w, h), Image.BICUBIC))
    img = Image.fromarray(smooth)
    c = Preprocess(input_size=224, resize="shorter", resize_to=256, interpolation="bicubic")
    scale = 256 / min(w, h)
    nw, nh = max(224, round(w * scale)), max(224, round(h * scale))
    full = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - 224) // 2, (nh - 224) // 2
    expected = np.asarray(full.crop((left, top, left + 224, top + 224))).astype(int)
    got = np.asarray(c.resize_image(img)).astype(int)
    assert got.shape == expected.shape == (224, 224, 3)
    diff = np.abs(got - expected)
    assert diff.max() <= 2 and diff.mean() < 0.2


def test_a_cropping_contract_takes_the_centre_of_arrays_and_files_alike(tmp_path):
    """MNIST's recipe trains on the centre 24 x 24 of its 28 x 28 images (resize "shorter",
    resize_to 28): in-memory arrays are sliced, an image file is cropped the same way."""
    c = Preprocess(input_size=24, channels=1, resize="shorter", resize_to=28, mean=(0.5,),
                   std=(0.5,))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    out = fit_arrays(images, c)
    assert out.shape == (5, 1, 24, 24) and out.flags.c_contiguous
    assert np.array_equal(out, images[:, :, 2:26, 2:26])
    path = tmp_path / "digit.png"
    Image.fromarray(images[3, 0]).save(path)
    assert np.array_equal(load_input(path, c), images[3, :, 2:26, 2:26])
