"""A hostile corpus through the one decoder (issue 11): every kind of image an attacker or a
broken tool can send, for an ImageNet contract and an MNIST digit contract. Each either gives a
correct-shaped uint8 array or raises an InputError subclass, within 2 s of CPU; the worst ones
are decoded in a fresh process whose peak memory is measured (under 300 MB)."""

from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.contract import Preprocess, lite_contract, load_input
from imgrec.errors import ExtremeAspectRatio, ImageTooLarge, InputError, NotAnImage, UnreadableImage

IMAGENET = lite_contract(224, 256)  # the efficientnet_lite0 contract
DIGIT = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto",
                   fit="digit")
CPU_SECONDS = 2.0
PEAK_MB = 300


# -- writers -----------------------------------------------------------------------------------
def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()




def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png_raw(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 0,
            before_idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + before_idat
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def zeros_zlib(n: int) -> bytes:
    """A zlib stream of n zero bytes, compressed a megabyte at a time."""
    z = zlib.compressobj(1)
    block = bytes(2**20)
    out = [z.compress(block) for _ in range(n // len(block))]
    out += [z.compress(bytes(n % len(block))), z.flush()]
    return b"".join(out)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header is patched to width x height (the data stays as it was)."""
    d = bytearray(data)
    sof = min(i for i in (d.find(b"\xff\xc0"), d.find(b"\xff\xc2")) if i >= 0)
    struct.pack_into(">HH", d, sof + 5, height, width)
    return bytes(d)


def gif_with_size(data: bytes, width: int, height: int, screen: bool = True) -> bytes:
    """A GIF whose first frame (and, with screen, its logical screen) claims width x height."""
    d = bytearray(data)
    if screen:
        struct.pack_into("<HH", d, 6, width, height)
    pos = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while d[pos] == 0x21:
        pos += 2
        while d[pos]:
            pos += 1 + d[pos]
        pos += 1
    struct.pack_into("<HH", d, pos + 5, width, height)
    return bytes(d)


def tiff_with_tags(data: bytes, **values: int) -> bytes:
    """A little-endian TIFF with some SHORT/LONG tags of its first IFD set (inline, as LONG)."""
    tags = {"width": 256, "height": 257, "rows": 278}
    want = {tags[k]: v for k, v in values.items()}
    d = bytearray(data)
    ifd = struct.unpack_from("<I", d, 4)[0]
    for i in range(struct.unpack_from("<H", d, ifd)[0]):
        at = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", d, at)[0]
        if tag in want:
            struct.pack_into("<HHII", d, at, tag, 4, 1, want[tag])
    return bytes(d)


def tiff_raw(width: int, height: int, bits: int, samples: int, pixels: bytes,
             tile: tuple[int, int] | None = None, compression: int = 1) -> bytes:
    """A little-endian TIFF written by hand: one strip (or one tile) of any bit depth."""
    where = [(322, 4, 1, tile[0]), (323, 4, 1, tile[1]), (324, 4, 1, None),
             (325, 4, 1, len(pixels))] if tile else [
        (273, 4, 1, None), (278, 4, 1, height), (279, 4, 1, len(pixels))]
    entries = sorted([(256, 4, 1, width), (257, 4, 1, height), (258, 3, samples, None),
                      (259, 3, 1, compression), (262, 3, 1, 2 if samples == 3 else 1),
                      (277, 3, 1, samples), *where])
    bits_at = 8 + 2 + 12 * len(entries) + 4
    data_at = bits_at + 2 * samples
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits if samples * 2 <= 4 else bits_at
        if tag in (273, 324):
            value = data_at
        out += struct.pack("<HHI", tag, kind, count)
        out += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
    out += struct.pack("<I", 0) + struct.pack("<H", bits) * samples
    return bytes(out) + pixels


def webp_lossless_with_size(data: bytes, width: int, height: int) -> bytes:
    d = bytearray(data)
    assert d[12:16] == b"VP8L"
    bits = struct.unpack_from("<I", d, 21)[0] & ~((1 << 28) - 1)
    struct.pack_into("<I", d, 21, bits | (width - 1) | ((height - 1) << 14))
    return bytes(d)


def bmp(width: int, height: int, body: bytes, bits: int = 8, compression: int = 0) -> bytes:
    palette = b"\x00\x00\x00\x00" * 256 if bits <= 8 else b""
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(body),
                         2835, 2835, 256 if palette else 0, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + header + palette + body


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan runs to the next real marker."""
    out, pos = [], 2
    while pos < len(data) and data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def exif_jpeg(orientation) -> bytes:
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, 30:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), "JPEG", exif=exif)


def gradient(w: int, h: int) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 5) % 251).astype(np.uint8)


# -- the corpus: name -> (bytes factory, what must come of it) ----------------------------------
OK, ANY = "ok", InputError


def _scan_bomb() -> bytes:
    """A progressive JPEG whose smallest scan is repeated 400 times (each costs bytes, but
    makes libjpeg visit every block again)."""
    data = save(Image.new("RGB", (4096, 4096), (90, 120, 30)), "JPEG", progressive=True)
    scans = [(a, e) for m, a, e in jpeg_segments(data) if m == 0xDA]
    a, e = min(scans[1:], key=lambda s: s[1] - s[0])
    return data[: scans[-1][1]] + data[a:e] * 400 + data[scans[-1][1] :]


def _animated_gif(frames: int) -> bytes:
    imgs = [Image.new("P", (64, 64), i % 256) for i in range(frames)]
    return save(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10)


def _float_tiff() -> bytes:
    arr = np.linspace(-1e30, 1e30, 300 * 200, dtype=np.float32).reshape(200, 300)
    arr[0, :10] = np.nan
    arr[1, :10] = np.inf
    return save(Image.fromarray(arr, "F"), "TIFF")


def _palette_bomb() -> bytes:
    """7000 x 7000 of palette index 0, which is transparent."""
    plte = png_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255]))
    return png_raw(7000, 7000, zeros_zlib(7000 * 7001), colour=3,
                   before_idat=plte + png_chunk(b"tRNS", b"\x00"))


def _exif_ifd(entries: int, count: int) -> bytes:
    """A TIFF-style IFD whose every entry claims `count` bytes at the same offset (Pillow reads
    each tag's data: the entries' total would be far over the block)."""
    out = b"II*\x00" + struct.pack("<IH", 8, entries)
    out += b"".join(struct.pack("<HHII", (0x9000 + i) % 65536, 1, count, 8) for i in range(entries))
    return out + bytes(4)


def _jpeg_exif_bomb() -> bytes:
    body = _exif_ifd(5000, 60000)
    body += bytes(65000 - len(body))
    jpeg = save(Image.new("RGB", (16, 16)), "JPEG")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 8) + b"Exif\0\0" + body + jpeg[2:]


def _png_exif_bomb() -> bytes:
    body = _exif_ifd(65535, 4_000_000)
    png = save(Image.new("RGB", (16, 16)), "PNG")
    return png[:33] + png_chunk(b"eXIf", body + bytes(4_000_000)) + png[33:]


def _spiral() -> bytes:
    """A one-pixel maze: the digit fit's connected components take the longest to settle."""
    arr = np.zeros((400, 400), np.uint8)
    top, left, bottom, right = 0, 0, 399, 399
    while top < bottom and left < right:
        arr[top, left : right + 1] = arr[top : bottom + 1, right] = 255
        arr[bottom, left : right + 1] = 255
        arr[top + 2 : bottom + 1, left] = 255
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return save(Image.fromarray(arr), "PNG")


CORPUS: dict[str, tuple] = {
    # extreme aspect ratios, both ways (issue 11, finding 1)
    "png 200000x1 1-bit (105 bytes)": (
        lambda: save(Image.new("1", (200_000, 1), 1), "PNG", optimize=True), ExtremeAspectRatio),
    "png 1x200000": (lambda: save(Image.new("L", (1, 200_000), 9), "PNG"), ExtremeAspectRatio),
    "png 20000x1": (lambda: save(Image.new("L", (20_000, 1), 200), "PNG"), ExtremeAspectRatio),
    "png 1x6000": (lambda: save(Image.new("RGB", (1, 6000), 7), "PNG"), ExtremeAspectRatio),
    "jpeg 12000x200 (60:1)": (lambda: save(Image.new("L", (12_000, 200), 99), "JPEG"),
                              ExtremeAspectRatio),
    "png 10000x200 (50:1, allowed)": (lambda: save(Image.new("L", (10_000, 200), 50), "PNG"), OK),
    "png 150x7500 (50:1, allowed)": (lambda: save(Image.new("RGB", (150, 7500), 3), "PNG"), OK),
    "png 1x1": (lambda: save(Image.new("RGB", (1, 1), 3), "PNG"), OK),
    # huge headers, little data (finding 2 and its cousins)
    "jpeg patched to 8000x7999": (
        lambda: jpeg_with_size(save(Image.fromarray(gradient(16, 16)), "JPEG"), 8000, 7999),
        UnreadableImage),
    "jpeg patched height 0 (DNL)": (
        lambda: jpeg_with_size(save(Image.new("L", (16, 16)), "JPEG"), 16, 0), UnreadableImage),
    "png 7999x8000 RGBA, 60 bytes of data": (
        lambda: png_raw(7999, 8000, zlib.compress(bytes(64)), colour=6), UnreadableImage),
    "png 30000x30000 bomb": (lambda: png_raw(30000, 30000, zlib.compress(bytes(64))),
                             ImageTooLarge),
    "png 8000x8000 RGB of zeros (64 MP, 256 MB decoded)": (
        lambda: png_raw(8000, 8000, zeros_zlib(8000 * (1 + 8000 * 3)), colour=2), OK),
    "progressive jpeg claiming 8000x8000 4:4:4 (384 MB of coefficients)": (
        lambda: jpeg_with_size(save(Image.fromarray(np.random.default_rng(0).integers(
            0, 256, (1000, 1000, 3), np.uint8)), "JPEG", progressive=True, subsampling=0,
            quality=50), 8000, 8000), ImageTooLarge),
    "gif frame 8000x8000, tiny LZW data": (
        lambda: gif_with_size(save(Image.new("P", (8, 8), 1), "GIF"), 8000, 8000),
        UnreadableImage),
    "gif screen 8000x8000, 8x8 frame": (
        lambda: (lambda g: g[:6] + struct.pack("<HH", 8000, 8000) + g[10:])(
            save(Image.new("P", (8, 8), 1), "GIF")), ANY),
    "webp lossless patched to 8000x8000": (
        lambda: webp_lossless_with_size(save(Image.new("RGB", (16, 16), 5), "WEBP",
                                             lossless=True), 8000, 8000), ImageTooLarge),
    "webp lossless patched to 16383x16383": (
        lambda: webp_lossless_with_size(save(Image.new("RGB", (16, 16), 5), "WEBP",
                                             lossless=True), 16383, 16383), ImageTooLarge),
    "webp lossless patched to 3000x2000": (
        lambda: webp_lossless_with_size(save(Image.fromarray(gradient(64, 64)), "WEBP",
                                             lossless=True), 3000, 2000), UnreadableImage),
    "tiff patched to 8000x8000, 8x8 of strips": (
        lambda: tiff_with_tags(save(Image.new("L", (8, 8), 3), "TIFF"), width=8000,
                               height=8000, rows=8000), UnreadableImage),
    "tiff deflate, 64x64 in a 60000x60000 tile": (
        lambda: tiff_raw(64, 64, 8, 1, zlib.compress(bytes(60000 * 100)), tile=(60000, 60000),
                         compression=8), ImageTooLarge),
    "tiff deflate, 64x64 in a 64x64 tile": (
        lambda: tiff_raw(64, 64, 8, 1, zlib.compress(bytes(range(64)) * 64), tile=(64, 64),
                         compression=8), OK),
    "bmp 8000x8000 24-bit, 12 bytes": (lambda: bmp(8000, 8000, bytes(12), bits=24),
                                        UnreadableImage),
    "bmp rle8 4000x4000 end-of-line bomb": (
        lambda: bmp(4000, 4000, b"\x01\x05\x00\x00" * 4000 + b"\x00\x01", compression=1),
        ImageTooLarge),
    "bmp rle8 300x200": (lambda: bmp(300, 200, b"\xff\x07\x2d\x07\x00\x00" * 200
                                     + b"\x00\x01", compression=1), OK),
    "ppm 8000x8000, 10 bytes": (lambda: b"P5\n8000 8000\n255\n" + bytes(10), UnreadableImage),
    "ppm 16-bit": (lambda: b"P5\n30 20\n65535\n" + bytes(range(256)) * 4 + bytes(176), OK),
    # parsing bombs: structures Pillow walks in Python
    "png 100k empty chunks": (
        lambda: png_raw(8, 8, zlib.compress(bytes(72)), before_idat=png_chunk(b"abCd", b"")
                        * 100_000), UnreadableImage),
    "jpeg 1 MB of fill bytes": (
        lambda: (lambda j: j[:2] + b"\xff" * 2**20 + j[2:])(save(Image.new("L", (8, 8)), "JPEG")),
        UnreadableImage),
    "jpeg 100k APP segments": (
        lambda: (lambda j: j[:2] + b"\xff\xe5\x00\x02" * 100_000 + j[2:])(
            save(Image.new("L", (8, 8)), "JPEG")), UnreadableImage),
    "jpeg progressive scan bomb": (_scan_bomb, ImageTooLarge),
    "gif 100k comment blocks": (
        lambda: (lambda g: g[:13 + 6] + b"\x21\xfe\x01a\x00" * 100_000 + g[13 + 6:])(
            save(Image.new("P", (8, 8)), "GIF")), ANY),
    "tiff 5000 tags": (
        lambda: save(Image.new("L", (8, 8)), "TIFF")[:8] + struct.pack("<H", 5000)
        + bytes(12 * 5000), UnreadableImage),
    "animated gif, 3000 frames": (lambda: _animated_gif(3000), OK),
    "animated png, 500 frames": (
        lambda: save(Image.new("RGB", (32, 32)), "PNG", save_all=True,
                     append_images=[Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(499)]),
        OK),
    # modes and depths
    "palette bomb 7000x7000 with transparency": (_palette_bomb, OK),
    "cmyk jpeg": (lambda: save(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG"), OK),
    "lab tiff": (lambda: save(Image.new("LAB", (300, 200), (50, 20, -20)), "TIFF"), OK),
    "i;16 png 6000x6000": (lambda: png_raw(6000, 6000, zeros_zlib(6000 * 12001), depth=16),
                           OK),
    "i;16 tiff": (lambda: save(Image.fromarray(np.arange(60000, dtype=np.uint16)
                                               .reshape(200, 300)), "TIFF"), OK),
    "float tiff with nan and inf": (_float_tiff, OK),
    "rgb 16-bit-per-channel tiff": (
        lambda: tiff_raw(40, 30, 16, 3, (bytes(range(256)) * 29)[:7200]), ANY),
    "tiff 4000x4000 claimed, one strip of 100 bytes": (
        lambda: tiff_raw(4000, 4000, 8, 1, bytes(100)), UnreadableImage),
    "1-bit png 4000x3000": (lambda: save(Image.new("1", (4000, 3000), 1), "PNG"), OK),
    "la png": (lambda: save(Image.new("LA", (300, 200), (90, 128)), "PNG"), OK),
    "rgba webp": (lambda: save(Image.new("RGBA", (300, 200), (9, 8, 7, 100)), "WEBP"), OK),
    "exif orientation 6": (lambda: exif_jpeg(6), OK),
    "exif orientation 8": (lambda: exif_jpeg(8), OK),
    "exif orientation 99": (lambda: exif_jpeg(99), OK),
    "jpeg exif of 5000 tags reading 60 kB each": (_jpeg_exif_bomb, OK),
    "png exif of 65535 tags reading 4 MB each": (_png_exif_bomb, OK),
    "jpeg 8000x8000 (decoded at 1/8)": (
        lambda: save(Image.new("L", (8000, 8000), 128), "JPEG", quality=50), OK),
    "progressive jpeg 4000x3000": (
        lambda: save(Image.fromarray(np.repeat(gradient(4000, 3000)[..., None], 3, 2)), "JPEG",
                     progressive=True, quality=70), OK),
    "png 8000x8000 greyscale": (lambda: png_raw(8000, 8000, zeros_zlib(8000 * 8001)), OK),
    "png 41000x1530 rgb (27:1, 63 MP)": (
        lambda: png_raw(41000, 1530, zeros_zlib(1530 * (1 + 41000 * 3)), colour=2), OK),
    "webp 4000x4000": (lambda: save(Image.new("RGB", (4000, 4000), (30, 90, 200)), "WEBP"), OK),
    "png 5000x5000 rgba": (lambda: png_raw(5000, 5000, zeros_zlib(5000 * 20001), colour=6),
                           OK),
    "spiral maze for the digit fit": (_spiral, OK),
    # not images, and broken ones
    "zero bytes": (lambda: b"", NotAnImage),
    "text": (lambda: b"hello, I am text\n" * 10, NotAnImage),
    "html": (lambda: b"<!doctype html><html><body><img src=x></body></html>", NotAnImage),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
            NotAnImage),
    "png signature then garbage": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                                   UnreadableImage),
    "jpeg cut in half": (lambda: (lambda j: j[: len(j) // 2])(
        save(Image.fromarray(gradient(200, 200)), "JPEG")), UnreadableImage),
    "png cut in half": (lambda: (lambda p: p[: len(p) // 2])(
        save(Image.fromarray(gradient(200, 200)), "PNG")), UnreadableImage),
    "gif cut in half": (lambda: (lambda g: g[: len(g) // 2])(
        save(Image.fromarray(gradient(200, 200)), "GIF")), ANY),
    "webp cut in half": (lambda: (lambda w: w[: len(w) // 2])(
        save(Image.fromarray(gradient(200, 200)), "WEBP")), UnreadableImage),
    "tiff cut in half": (lambda: (lambda t: t[: len(t) // 2])(
        save(Image.fromarray(gradient(200, 200)), "TIFF")), UnreadableImage),
    "bmp cut in half": (lambda: (lambda b: b[: len(b) // 2])(
        save(Image.fromarray(gradient(200, 200)), "BMP")), UnreadableImage),
}


def check(data: bytes, contract: Preprocess, expect) -> tuple[str, float]:
    """Decode through the contract; returns what came of it and the CPU seconds it took."""
    start = time.process_time()
    try:
        out = load_input(data, contract)
    except InputError as e:
        took = time.process_time() - start
        assert expect is not OK, f"refused: {e}"
        assert isinstance(e, expect), f"{type(e).__name__}: {e}"
        assert e.http_status in (413, 415, 422) and e.message
        return type(e).__name__, took
    took = time.process_time() - start
    assert expect in (OK, ANY), f"decoded, but {expect.__name__} was expected"
    size = contract.input_size
    assert out.dtype == np.uint8 and out.shape == (contract.channels, size, size)
    return "ok", took


@functools.cache
def corpus_bytes(kind: str) -> bytes:
    return CORPUS[kind][0]()


#: decoded in a fresh process, whose peak memory is measured
WORST = {"png 8000x8000 greyscale", "png 5000x5000 rgba",
         "palette bomb 7000x7000 with transparency", "jpeg 8000x8000 (decoded at 1/8)",
         "progressive jpeg 4000x3000", "i;16 png 6000x6000",
         "png 8000x8000 RGB of zeros (64 MP, 256 MB decoded)",
         "webp lossless patched to 3000x2000", "gif screen 8000x8000, 8x8 frame",
         "float tiff with nan and inf", "png 41000x1530 rgb (27:1, 63 MP)", "webp 4000x4000",
         "png exif of 65535 tags reading 4 MB each"}

_MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from test_hostile_images import CORPUS, DIGIT, IMAGENET, check
data = open(sys.argv[2], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = [check(data, c, CORPUS[sys.argv[3]][1]) for c in (IMAGENET, DIGIT)]
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"results": results, "peak_mb": peak}))
"""


def in_fresh_process(kind: str, data: bytes, tmp_path: Path) -> list[tuple[str, float]]:
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(Path(__file__).parent), str(path),
                          kind], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["peak_mb"] < PEAK_MB, f"{kind}: {report['peak_mb']:.0f} MB at peak"
    return report["results"]


@pytest.mark.parametrize("kind", list(CORPUS))
def test_hostile_image(kind, tmp_path):
    data = corpus_bytes(kind)
    assert len(data) <= 20 * 2**20
    if kind in WORST:
        results = in_fresh_process(kind, data, tmp_path)
    else:
        results = [check(data, contract, CORPUS[kind][1]) for contract in (IMAGENET, DIGIT)]
    for outcome, took in results:
        assert took < CPU_SECONDS, f"{kind}: {outcome} after {took:.2f} s of CPU"


def test_corpus_is_wide():
    assert len(CORPUS) >= 30 and WORST <= set(CORPUS)
