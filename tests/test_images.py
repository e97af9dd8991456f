"""The one safe decoder: EXIF, every mode, bombs, broken and disguised files."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.contract import Preprocess
from imgrec.errors import ImageTooLarge, NotAnImage, UnreadableImage
from imgrec.images import decode_image, sniff_format


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, left half black and right half white; Orientation=6 means
    # "rotate 90 degrees clockwise to display", so the shown image is 20 wide x 40 high.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)  # the raw file is landscape
    out = decode_image(path)
    assert out.size == (20, 40)
    pixels = np.asarray(out)
    # Clockwise rotation moves the stored left (black) half to the top.
    assert pixels[:15].mean() < 40
    assert pixels[25:].mean() > 215


@pytest.mark.parametrize("channels", [1, 3])
def test_greyscale_l(channels):
    img = Image.fromarray(np.full((8, 9), 77, np.uint8), mode="L")
    out = decode_image(_png_bytes(img), channels=channels)
    assert out.mode == ("L" if channels == 1 else "RGB")
    assert out.size == (9, 8)
    assert np.all(np.asarray(out) == 77)


def test_la_transparent_becomes_white():
    arr = np.zeros((6, 6, 2), np.uint8)  # black, fully transparent
    arr[:3, :, 1] = 255  # top half opaque black
    img = Image.fromarray(arr, mode="LA")
    out = np.asarray(decode_image(_png_bytes(img), channels=1))
    assert np.all(out[:3] == 0)
    assert np.all(out[3:] == 255)


def test_palette_without_transparency():
    img = Image.new("P", (5, 5))
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.putpixel((0, 0), 1)
    out = np.asarray(decode_image(_png_bytes(img)))
    assert out.shape == (5, 5, 3)
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[4, 4]) == (255, 0, 0)


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (4, 4))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # index 0 (red) is transparent
    out = np.asarray(decode_image(_png_bytes(img)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_rgba_transparent_becomes_white_and_opaque_kept():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red-ish everywhere
    arr[:2, :, 3] = 255  # top half opaque, bottom transparent
    out = np.asarray(decode_image(_png_bytes(Image.fromarray(arr, "RGBA"))))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 256, 32768, 65535]], np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(_png_bytes(img), channels=1))
    # Clipping would make everything above 255 white; scaling keeps the gradient.
    assert out.tolist() == [[0, 1, 128, 255]]


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    out = decode_image(path)
    assert out.mode == "RGB"
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("L", (6, 6), v) for v in (10, 250)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    out = np.asarray(decode_image(path, channels=1))
    assert abs(int(out.mean()) - 10) <= 2


def test_channels_one_vs_three_from_rgb():
    arr = np.zeros((3, 3, 3), np.uint8)
    arr[..., 1] = 255
    data = _png_bytes(Image.fromarray(arr))
    grey = decode_image(data, channels=1)
    rgb = decode_image(data, channels=3)
    assert grey.mode == "L" and rgb.mode == "RGB"
    assert np.asarray(grey).shape == (3, 3)
    assert np.asarray(rgb).shape == (3, 3, 3)
    assert abs(int(np.asarray(grey)[0, 0]) - 150) <= 2  # ITU-R 601 luma of pure green


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bomb_refused_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(30000, 30000))
    with pytest.raises(ImageTooLarge) as e:
        decode_image(path)
    assert "30000x30000" in str(e.value)
    assert e.value.http_status == 413


def test_pixel_limit_is_configurable():
    data = _png_bytes(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=399)
    assert decode_image(data, max_pixels=400).size == (20, 20)


def test_truncated_jpeg_is_unreadable(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.read_bytes()[:400])
    with pytest.raises(UnreadableImage) as e:
        decode_image(path)
    assert not isinstance(e.value, NotAnImage | ImageTooLarge)
    assert "cut.jpg" in str(e.value) and "JPEG" in str(e.value)


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text\n")
    with pytest.raises(NotAnImage) as e:
        decode_image(path)
    assert "notes.jpg" in str(e.value)
    assert e.value.http_status == 415


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(NotAnImage):
        decode_image(empty)
    with pytest.raises(UnreadableImage, match="no such file"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(UnreadableImage, match="folder"):
        decode_image(tmp_path)


def test_png_named_jpg_decodes(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(_png_bytes(Image.new("RGB", (7, 5), (1, 2, 3))))
    out = decode_image(path)
    assert out.size == (7, 5)
    assert tuple(np.asarray(out)[0, 0]) == (1, 2, 3)


def test_sniff_format():
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\n") == "PNG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(b"<html>") is None


def test_draft_decodes_big_jpeg_smaller(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (90, 90, 90)).save(path)
    assert decode_image(path, draft_size=(100, 100)).size[0] < 800
    assert decode_image(Path(path)).size == (800, 600)


def test_extreme_aspect_ratio_is_refused_from_the_header():
    """Issue 11, finding 1: a 105-byte PNG of 200000 x 1 pixels made the server allocate
    24 GB (a 20000 x 1 one took 23-38 s and 6 GB). It is refused from its header: 422, with the
    ratio and the limit named."""
    from imgrec.contract import load_input
    from imgrec.errors import ExtremeAspectRatio
    from imgrec.images import MAX_ASPECT_RATIO

    contract = Preprocess(224, 3, "shorter", 256, "bicubic")
    for shape in ((200_000, 1), (1, 200_000), (20_000, 1), (6000, 1), (1000, 19)):
        buf = io.BytesIO()
        Image.new("1", shape, 1).save(buf, "PNG", optimize=True)
        if shape == (200_000, 1):
            assert len(buf.getvalue()) == 105
        start = time.process_time()
        with pytest.raises(ExtremeAspectRatio) as e:
            load_input(buf.getvalue(), contract)
        assert time.process_time() - start < 0.2
        ratio = f"{max(shape) / min(shape):,.1f}".removesuffix(".0")  # 200,000 / 52.6
        assert f"{ratio}:1" in str(e.value) and f"limit of {MAX_ASPECT_RATIO}:1" in str(e.value)
        assert e.value.http_status == 422 and isinstance(e.value, UnreadableImage)


def test_long_side_is_cut_before_resizing(monkeypatch):
    """Within the ratio limit the long side is cut down to what the centre crop keeps before
    the resize, never resized to millions of pixels."""
    from imgrec.contract import load_input

    sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, *a, **k):
        sizes.append(size)
        return real_resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    contract = Preprocess(224, 3, "shorter", 256, "bicubic")
    for shape in ((5000, 100), (100, 5000), (2000, 40)):
        buf = io.BytesIO()
        Image.new("L", shape, 200).save(buf, "PNG")
        assert load_input(buf.getvalue(), contract).shape == (3, 224, 224)
    assert max(w * h for w, h in sizes) < 10 * 256 * 256, sizes
    # an ordinary photo is resampled once, over its centre crop only (640x480 -> the box that
    # becomes 224x224 of its 341x256 resize)
    sizes.clear()
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 120, 30)).save(buf, "JPEG")
    load_input(buf.getvalue(), contract)
    assert sizes == [(224, 224)]


def test_pillow_guard_is_left_as_it_is(tmp_path):
    """Importing imgrec and decoding (a bomb too) leaves Pillow's process-wide bomb guard at
    its default: imgrec's own limit is checked from the header, not by switching Pillow's off."""
    import subprocess
    import sys

    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(30000, 30000))
    code = f"""
import PIL.Image as I
default = I.MAX_IMAGE_PIXELS
import imgrec, imgrec.images, imgrec.contract, imgrec.doctor
from imgrec.errors import ImageTooLarge
assert I.MAX_IMAGE_PIXELS == default, I.MAX_IMAGE_PIXELS
assert imgrec.images.decode_image({str(_png_bytes(Image.new("RGB", (9, 9))))}).size == (9, 9)
try:
    imgrec.images.decode_image({str(path)!r})
except ImageTooLarge as e:
    assert "30000x30000" in str(e), e
assert I.MAX_IMAGE_PIXELS == default and default == 89478485, I.MAX_IMAGE_PIXELS
import PIL.ImageFile as F
assert F.LOAD_TRUNCATED_IMAGES is False
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.MAX_IMAGE_PIXELS == 89478485


def test_images_over_pillows_limit_within_ours(monkeypatch):
    """Where Pillow's own limit is lower than imgrec's, imgrec still decodes what its limit
    allows and refuses the rest in its own words; Pillow's setting is untouched."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = _png_bytes(Image.new("L", (40, 40), 7))  # 1600 pixels: Pillow would warn
    refused = _png_bytes(Image.new("L", (50, 50), 7))  # 2500: Pillow's open would raise
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(refused))
    assert decode_image(warned, channels=1).size == (40, 40)
    assert np.all(np.asarray(decode_image(refused, channels=1)) == 7)
    with pytest.raises(ImageTooLarge, match="50x50 pixels is over the limit of 2,000"):
        decode_image(refused, max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_devices_and_pipes_are_refused_without_reading_them(tmp_path):
    """/dev/zero was read until memory ran out, and a named pipe waited for a writer for
    ever: a path that is not a regular file is refused before it is opened."""
    import os

    from imgrec.errors import UnreadableImage
    from imgrec.images import decode_image

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(UnreadableImage, match="not a regular file"):
            decode_image(path)


def test_an_aspect_ratio_just_over_the_limit_is_not_rounded_onto_it():
    """2x101 is 50.5:1: "an aspect ratio of 50:1, over the limit of 50:1" read as nonsense."""
    from imgrec.errors import ExtremeAspectRatio
    from imgrec.images import check_size

    with pytest.raises(ExtremeAspectRatio, match=r"aspect ratio of 50\.5:1, over the limit"):
        check_size(2, 101, "x", 10**9)
    with pytest.raises(ExtremeAspectRatio, match=r"aspect ratio of 200,000:1"):
        check_size(200_000, 1, "x", 10**9)


def test_tiff_with_a_compression_pillow_has_no_codec_for_is_named_as_such():
    """A TIFF whose compression tag names a scheme Pillow cannot decode read as "corrupt or
    truncated TIFF (SyntaxError: 65000)"; it is now named, with formats that work."""
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, "TIFF", compression="raw")
    data = bytearray(buf.getvalue())
    at = data.find(struct.pack("<HHI", 259, 3, 1))  # the Compression tag, one SHORT
    assert at > 0
    data[at + 8 : at + 10] = struct.pack("<H", 65000)
    with pytest.raises(UnreadableImage) as e:
        decode_image(bytes(data), 3)
    assert "compressed with scheme 65000" in e.value.message
    assert "LZW" in e.value.hint
    for compression in ("tiff_lzw", "tiff_deflate", "packbits", "jpeg"):  # still read
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), "red").save(buf, "TIFF", compression=compression)
        assert decode_image(buf.getvalue(), 3).size == (20, 20)
