"""The one safe image decoder. Everything that turns bytes or a file into pixels comes here:
training, evaluation, prediction, serving and the dataset doctor.

It sniffs the format from the bytes (not the file name), refuses decompression bombs before
decoding a pixel, applies EXIF orientation, and converts any mode (L, LA, P, RGBA, I;16, CMYK,
animated GIF) to the channel count a model wants. Torch-free: the serve path uses it.

The bomb check is imgrec's own (MAX_PIXELS, or the caller's limit, read from the header). It
leaves Pillow's process-wide guard (Image.MAX_IMAGE_PIXELS) as it is: importing imgrec changes
no Pillow setting for the rest of the process.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ImageTooLarge, NotAnImage, UnreadableImage

#: Default pixel-count limit (width x height). 64 MP covers any camera photo; a 30000 x 30000
#: PNG bomb (900 MP) is refused from its header alone.
MAX_PIXELS = 64_000_000

_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    (b"P5", 0, "PPM"),
    (b"P6", 0, "PPM"),
]

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
}


def sniff_format(head: bytes) -> str | None:
    """The image format named by the leading bytes, or None when they are no image we read."""
    for magic, offset, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            if name == "WEBP" and head[:4] != b"RIFF":
                continue
            return name
    return None


def _read(source: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "upload"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file", "check the path") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a folder, not an image") from None
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot read ({e.strerror})") from None


def open_image(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Pillow's lazy open of `data`, an image in format `fmt` (from sniff_format): its header is
    parsed (size, mode, EXIF), no pixel is decoded yet, whatever size the header claims.

    Image.open would first apply Pillow's own bomb guard (a warning over
    Image.MAX_IMAGE_PIXELS, an error over twice that) before anyone can read the size, in its
    own words and with its own limit. imgrec checks the size itself, from this header, against
    its own limit (decode_image; the dataset doctor), so it calls the format's plugin, the
    parser Image.open would pick, directly: for this one image, without switching Pillow's
    guard off for the whole process."""
    if fmt not in Image.OPEN:
        Image.init()  # the plugins beyond the common five (TIFF, WebP) register on first use
    entry = Image.OPEN.get(fmt)
    if entry is None:  # a Pillow built without this format: let it say so
        return Image.open(io.BytesIO(data), formats=[fmt])
    factory, _accept = entry
    return factory(io.BytesIO(data))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale to 8-bit by scaling, not clipping (Pillow's convert clips)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint16 or img.mode.startswith("I;16"):
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) * (255.0 / (hi - lo or 1.0))).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _convert(img: Image.Image, channels: int) -> Image.Image:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels become white, as they look in a browser on a white page.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        img = background
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(
    source: str | Path | bytes,
    channels: int = 3,
    max_pixels: int = MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a file or bytes into an 8-bit L (channels=1) or RGB (channels=3) image.

    `draft_size` lets JPEG decode at a reduced scale when the model needs far fewer pixels
    (several times faster on big photos). Raises UnreadableImage (or a subclass) with a message
    that names the problem.
    """
    data, name = _read(source)
    if not data:
        raise NotAnImage(f"{name}: empty file", "give a JPEG, PNG, GIF, BMP, TIFF or WebP image")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise NotAnImage(
            f"{name}: not an image (content is no JPEG, PNG, GIF, BMP, TIFF or WebP)",
            "give an image file",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, fmt)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}",
                    "resize the image (possible decompression bomb)",
                )
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB" if channels == 3 else "L", draft_size)
            img.seek(0)  # first frame of an animation
            img.load()
            img = ImageOps.exif_transpose(img)
            return _convert(img, channels)
    except UnreadableImage:
        raise
    except Exception as e:  # Pillow raises many types for broken files
        raise UnreadableImage(
            f"{name}: corrupt or truncated {fmt} ({type(e).__name__}: {e})",
            "re-export or remove the file",
        ) from None


def is_image_path(path: Path) -> bool:
    """Whether a file name looks like an image (used when listing folders)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
