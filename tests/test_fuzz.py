"""Fuzzing the one decoder (issue 11) with Hypothesis: random bytes, and real JPEG, PNG, GIF,
WebP, TIFF and BMP files (scikit-image's sample photos) with bytes flipped, cut short, header
fields patched to extreme values, and slices repeated. Whatever comes in, `decode_image` and
`load_input` give an image or raise an ImgrecError, nothing else, within the time bound.
Derandomised and database-less: every run tries the same examples."""

from __future__ import annotations

import functools
import io
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgrec.contract import Preprocess, lite_contract, load_input
from imgrec.errors import ImgrecError
from imgrec.images import decode_image

CPU_SECONDS = 2.0
CONTRACTS = (lite_contract(224, 256),
             Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto",
                        fit="digit"))
FUZZ = settings(database=None, derandomize=True, deadline=2000, max_examples=1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FORMATS = {
    "JPEG": {"quality": 80}, "progressive JPEG": {"quality": 80, "progressive": True},
    "PNG": {}, "interlaced PNG": {"interlace": 1}, "GIF": {}, "WEBP": {"quality": 70},
    "lossless WEBP": {"lossless": True}, "TIFF": {}, "deflate TIFF": {"compression":
                                                                      "tiff_adobe_deflate"},
    "BMP": {}, "PPM": {},
}


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small real files of every format, from scikit-image's astronaut and camera."""
    from skimage import data

    colour = Image.fromarray(data.astronaut()).resize((48, 40))
    grey = Image.fromarray(data.camera()).resize((40, 48))
    out = {}
    for name, kw in FORMATS.items():
        fmt = name.split()[-1]
        for label, img in (("colour", colour), ("grey", grey)):
            buf = io.BytesIO()
            img.save(buf, fmt, **kw)
            out[f"{name} {label}"] = buf.getvalue()
    return out


def decodes_or_refuses(data: bytes, contract: Preprocess | None) -> None:
    """The property: an image (or model pixels) or an ImgrecError, within the time bound."""
    start = time.process_time()
    try:
        if contract is None:
            img = decode_image(data)
            assert img.mode == "RGB" and min(img.size) >= 1
        else:
            out = load_input(data, contract)
            size = contract.input_size
            assert out.dtype == np.uint8 and out.shape == (contract.channels, size, size)
    except ImgrecError as e:
        assert e.message
    took = time.process_time() - start
    assert took < CPU_SECONDS, f"{took:.2f} s of CPU"


contracts = st.sampled_from((None, *CONTRACTS))
seed_names = st.sampled_from(sorted(FORMATS))


@st.composite
def mutated(draw) -> bytes:
    """A seed file with one or more of: byte flips, header fields patched, a cut, a slice
    repeated."""
    name = draw(seed_names) + draw(st.sampled_from((" colour", " grey")))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(("flip", "patch", "cut", "repeat")))
        if kind == "flip":
            for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
                data[at] ^= draw(st.integers(1, 255))
        elif kind == "patch":  # a size, count, length or offset field in the header
            at = draw(st.integers(0, min(len(data), 160) - 1))
            value = draw(st.sampled_from((0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 8000, 0xFFFFFFFF)))
            width = draw(st.sampled_from((1, 2, 4)))
            order = draw(st.sampled_from(("big", "little")))
            data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, order)
        elif kind == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        else:
            a = draw(st.integers(0, len(data) - 1))
            b = draw(st.integers(a, min(len(data), a + 64)))
            data[b:b] = bytes(data[a:b]) * draw(st.integers(2, 2000))
    return bytes(data)


def test_seeds_decode():
    for name, data in seeds().items():
        assert decode_image(data).size in ((48, 40), (40, 48)), name


@FUZZ
@given(data=st.binary(max_size=4096), contract=contracts)
def test_random_bytes(data, contract):
    decodes_or_refuses(data, contract)


@FUZZ
@given(head=st.sampled_from((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM",
                             b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP", b"P6")),
       tail=st.binary(max_size=4096), contract=contracts)
def test_random_bytes_behind_a_signature(head, tail, contract):
    decodes_or_refuses(head + tail, contract)


@FUZZ
@given(data=mutated(), contract=contracts)
def test_mutated_real_files(data, contract):
    decodes_or_refuses(data, contract)


@pytest.mark.parametrize("name", ["JPEG colour", "PNG grey", "GIF colour", "WEBP colour",
                                  "TIFF grey", "BMP colour"])
def test_every_truncation_of_a_file(name):
    """Every cut of a small file, a byte at a time from the end of its header on."""
    data = seeds()[name]
    for n in range(0, len(data), max(1, len(data) // 300)):
        decodes_or_refuses(data[:n], CONTRACTS[0])
