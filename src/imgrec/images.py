"""The one safe image decoder. Everything that turns bytes or a file into pixels comes here:
training, evaluation, prediction, serving and the dataset doctor.

It sniffs the format from the bytes (not the file name), applies EXIF orientation, and converts
any mode (L, LA, P, RGBA, I;16, F, CMYK, LAB, animated GIF) to the channel count a model wants.
Torch-free: the serve path uses it.

The cost of an image is bounded before a pixel is decoded, from what its header says (read by
imgrec's own walk of the file's structure, ahead of Pillow's, so a file of a million chunks or
markers is refused before Pillow loops over them):

- pixels: at most MAX_PIXELS (or the caller's limit); an aspect ratio of at most
  MAX_ASPECT_RATIO (a 200000 x 1 PNG is a hundred bytes and means nothing to a classifier);
- memory: the decoder's buffers (the image at the scale it is decoded at, JPEG coefficients,
  libtiff strips, libwebp canvases) at most MAX_DECODE_BYTES;
- time: progressive JPEG scans x blocks, run-length BMPs (Pillow decodes those in Python);
- truthful headers: a frame whose header promises more pixels than its data could encode at
  the format's best compression (a JPEG patched to 8000 x 7999 with 16 x 16 of data) is
  refused as truncated, never padded with grey.

A large image is decoded at reduced scale (JPEG draft); one too big to convert whole is reduced
by an integer factor as it is converted, in strips, to no less than REDUCING_GAP times the size
the caller needs (Pillow's resize would reduce it so), so no full-size copy is made.

The bomb checks are imgrec's own. They leave Pillow's process-wide settings
(Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) as they are: importing imgrec changes
no Pillow setting for the rest of the process.
"""

from __future__ import annotations

import io
import math
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from .errors import ExtremeAspectRatio, ImageTooLarge, NotAnImage, UnreadableImage

#: Default pixel-count limit (width x height). 64 MP covers any camera photo; a 30000 x 30000
#: PNG bomb (900 MP) is refused from its header alone.
MAX_PIXELS = 64_000_000
#: the largest image file read (64 megapixels of 16-bit RGBA, uncompressed, is 512 MB)
MAX_FILE_BYTES = 1 << 30
#: The longest side over the shortest: panoramas and long screenshots pass, a 1 x N strip does not.
MAX_ASPECT_RATIO = 50
#: What the decoder may allocate for one image (its pixels at the decoded scale plus the
#: decoder's own buffers): peak memory of one decode stays near this.
MAX_DECODE_BYTES = 256 * 2**20
#: Chunks (PNG), markers (JPEG), blocks (GIF) or tags (TIFF) walked in a header: Pillow parses
#: each in Python, so a file of a million empty chunks would take seconds before a pixel.
MAX_SEGMENTS = 20_000
#: Progressive JPEG: blocks x scans (every scan visits the whole coefficient buffer).
MAX_SCAN_WORK = 100_000_000
#: Run-length BMPs are decoded by Pillow in Python, a pixel (or two bytes) at a time.
MAX_RLE_PIXELS = 2**21
MAX_RLE_BYTES = 2**21
#: A big image is reduced right after decoding to no less than this many times the size the
#: caller needs (Pillow's resize reduces by the same rule with reducing_gap=3).
REDUCING_GAP = 3
_STRIP_PIXELS = 2**20

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

_FORMATS_HINT = "give a JPEG, PNG, GIF, BMP, TIFF, WebP or binary PPM/PGM image"


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
        info = path.stat()  # before opening: opening a pipe waits for its writer
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):  # /dev/zero, a pipe: reading never ends
            raise UnreadableImage(f"{path}: not a regular file (a device, pipe or socket)",
                                  "give an image file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageTooLarge(f"{path}: {info.st_size / 2**20:,.0f} MB is over the "
                                f"{MAX_FILE_BYTES // 2**20:,} MB an image file may have",
                                "resize or recompress the image")
        with path.open("rb") as f:
            return f.read(MAX_FILE_BYTES + 1), str(path)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file", "check the path") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a folder, not an image") from None
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot read ({e.strerror})") from None


def open_image(data: bytes, fmt: str, claim: Claim | None = None) -> ImageFile.ImageFile:
    """Pillow's lazy open of `data`, an image in format `fmt` (from sniff_format): its header is
    parsed (size, mode, EXIF), no pixel is decoded yet, whatever size the header claims.

    Image.open would first apply Pillow's own bomb guard (a warning over
    Image.MAX_IMAGE_PIXELS, an error over twice that) before anyone can read the size, in its
    own words and with its own limit. imgrec checks the size itself, from this header, against
    its own limit (decode_image; the dataset doctor), so it calls the format's plugin, the
    parser Image.open would pick, directly: for this one image, without switching Pillow's
    guard off for the whole process.

    The header is walked first (`read_claim`, or the caller's `claim` of it): a structure
    Pillow would spend seconds parsing (a million chunks, megabytes of JPEG fill bytes) is
    refused, and so is a WebP over MAX_PIXELS, whose canvas Pillow allocates as it opens it."""
    if claim is None:
        claim = read_claim(data, fmt)
        if fmt == "WEBP" and claim.width:
            check_size(claim.width, claim.height, "WebP")
    if fmt not in Image.OPEN:
        Image.init()  # the plugins beyond the common five (TIFF, WebP) register on first use
    entry = Image.OPEN.get(fmt)
    if entry is None:  # a Pillow built without this format: let it say so
        return Image.open(io.BytesIO(data), formats=[fmt])
    factory, _accept = entry
    return factory(io.BytesIO(data))


# -- what a header claims, read before Pillow parses it ---------------------------------------
@dataclass
class Claim:
    """What a file's structure says about its first frame, before any decoding."""

    width: int = 0  #: the canvas, 0 when the walk did not find it (Pillow's size is checked)
    height: int = 0
    data_bytes: int = -1  #: compressed pixel data present (-1: not counted)
    min_bytes: int = 0  #: the fewest bytes the format could encode the frame's pixels in
    extra_bytes: int = 0  #: decoder memory beyond the decoded image
    scan_work: int = 0  #: progressive JPEG: blocks x scans
    draftable: bool = True  #: JPEG: DCT scaling possible (not lossless)


class _Refused(Exception):
    """A header walk's reason to refuse (turned into UnreadableImage with the file's name)."""

    def __init__(self, message: str, hint: str = "re-export the image"):
        super().__init__(message)
        self.hint = hint


def read_claim(data: bytes, fmt: str) -> Claim:
    """Walk the file's structure (chunks, markers, blocks, tags: never pixel data) and say what
    it claims. Raises UnreadableImage or ImageTooLarge (without the file's name) for structures
    that no honest file has: a million chunks, megabytes of JPEG fill bytes, a TIFF tag of
    gigabytes, a run-length BMP too large for Pillow's Python decoder."""
    walk = _CLAIMS.get(fmt)
    if walk is None:
        return Claim()
    try:
        return walk(data)
    except _Refused as e:
        raise UnreadableImage(str(e), e.hint) from None
    except (struct.error, IndexError, ValueError):
        return Claim()  # a header too broken to walk: Pillow says what is wrong with it


def _too_many(fmt: str, what: str) -> _Refused:
    return _Refused(f"{fmt} of over {MAX_SEGMENTS:,} {what} (a parsing bomb)")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
_NOT_FF = re.compile(rb"[^\xff]")
_MAX_JUNK = 65536


def _jpeg_markers(data: bytes) -> tuple[bytes | None, int, int]:
    """(SOF marker + body or None, offset of the first SOS, its length): the walk Pillow's
    parser makes a byte at a time, done with bytes.find and capped."""
    pos, segments, junk, frame = 2, 0, 0, None
    while True:
        ff = data.find(b"\xff", pos)
        found = _NOT_FF.search(data, ff) if ff >= 0 else None
        if found is None:
            raise _Refused("truncated JPEG: the file ends before its image data")
        junk += ff - pos + found.start() - ff - 1
        if junk > _MAX_JUNK:
            raise _Refused(f"JPEG of over {_MAX_JUNK:,} bytes of padding between its markers")
        marker, pos = data[found.start()], found.start() + 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise _Refused("JPEG without image data (it ends before its first scan)")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if marker in _SOF and frame is None:
            frame = data[pos - 1 : pos + length]
        if marker == 0xDA:
            return frame, pos - 2, length
        segments += 1
        if segments > MAX_SEGMENTS:
            raise _too_many("JPEG", "markers before its image data")
        pos += length


def _jpeg_claim(data: bytes) -> Claim:
    frame, sos, _ = _jpeg_markers(data)
    if frame is None or len(frame) < 9:
        return Claim()
    height, width = struct.unpack(">HH", frame[4:8])
    n = frame[8]
    comps = [(frame[9 + 3 * i + 1] >> 4, frame[9 + 3 * i + 1] & 15) for i in range(n)]
    comps = [(h or 1, v or 1) for h, v in comps] or [(1, 1)]
    hmax, vmax = max(h for h, _ in comps), max(v for _, v in comps)
    blocks = samples = 0
    for h, v in comps:
        cw, ch = math.ceil(width * h / hmax), math.ceil(height * v / vmax)
        samples += cw * ch
        blocks += math.ceil(cw / 8) * math.ceil(ch / 8)
    scans = data.count(b"\xff\xda", sos)
    lossless = frame[0] in _LOSSLESS
    progressive = frame[0] in (0xC2, 0xC6, 0xCA, 0xCE)
    # Every 8 x 8 block (every sample when lossless) costs at least one bit in some scan: its
    # DC difference's code. 16 x 16 pixels of data behind an 8000 x 7999 header cannot be one.
    return Claim(width, height, data_bytes=len(data) - sos,
                 min_bytes=(samples if lossless else blocks) // 8,
                 extra_bytes=blocks * 128 if progressive or scans > 1 else 0,
                 scan_work=blocks * scans if scans > 1 else 0, draftable=not lossless)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_claim(data: bytes) -> Claim:
    pos, chunks, idat, header = 8, 0, 0, None
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > MAX_SEGMENTS:
            raise _too_many("PNG", "chunks")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IHDR" and header is None:
            header = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
        elif kind == b"IDAT":
            idat += min(length, len(data) - pos - 8)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return Claim()
    width, height, depth, colour = header
    row = 1 + math.ceil(width * depth * _PNG_CHANNELS.get(colour, 1) / 8)
    # deflate encodes at most 258 bytes in 2 bits (1032:1)
    return Claim(width, height, data_bytes=idat, min_bytes=height * row // 1032)


def _gif_subblocks(data: bytes, pos: int, enough: int, counted: list[int]) -> tuple[int, int]:
    """Walk sub-blocks from pos: (position after them, or where counting stopped; bytes)."""
    total = 0
    while pos < len(data) and data[pos]:
        counted[0] += 1
        if counted[0] > MAX_SEGMENTS:
            raise _too_many("GIF", "blocks before its first frame")
        total += data[pos]
        pos += 1 + data[pos]
        if total >= enough:
            break
    return pos + 1, total


def _gif_claim(data: bytes) -> Claim:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    counted = [0]
    while pos < len(data):
        kind = data[pos]
        if kind == 0x21:  # extension: label, then sub-blocks (Pillow reads them in Python)
            pos, _ = _gif_subblocks(data, pos + 2, 1 << 62, counted)
        elif kind == 0x2C:  # the first frame
            x, y, w, h, local = struct.unpack("<HHHHB", data[pos + 1 : pos + 10])
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            need = w * h // 4096  # LZW: a 12-bit code stands for at most 4096 pixels
            counted[0] = 0
            _, have = _gif_subblocks(data, pos, need + 1, counted)
            return Claim(max(width, x + w), max(height, y + h), data_bytes=have,
                         min_bytes=need)
        else:
            break
    return Claim(width, height)


def _bmp_claim(data: bytes) -> Claim:
    offset, header = struct.unpack("<II", data[10:18])
    if header < 40:
        return Claim()
    width, height, _, bits, compression = struct.unpack("<iiHHI", data[18:34])
    width, height = abs(width), abs(height)
    if compression in (1, 2):  # RLE8, RLE4: Pillow's decoder is Python, a pixel at a time
        if width * height > MAX_RLE_PIXELS or len(data) > MAX_RLE_BYTES:
            raise ImageTooLarge(
                f"a run-length compressed BMP of {width}x{height} pixels and {len(data):,} "
                f"bytes is over the limit of {MAX_RLE_PIXELS:,} pixels and "
                f"{MAX_RLE_BYTES:,} bytes for this slowly decoded format",
                "convert it to PNG")
        return Claim(width, height)
    if compression not in (0, 3, 6):
        return Claim(width, height)
    stride = (width * bits + 31) // 32 * 4
    return Claim(width, height, data_bytes=len(data) - offset, min_bytes=stride * height)


_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
_MAX_TIFF_TAG_BYTES = 4 * 2**20
#: the best compression ratio of a TIFF codec (deflate's 1032:1, LZW's 12-bit codes of at
#: most 4096 bytes, PackBits' 2 bytes for 128, JPEG's bit per 8 x 8 block); others: no bound
_TIFF_RATIO = {1: 1, 5: 4096, 7: 1024, 8: 1032, 32946: 1032, 32773: 64}


def _tiff_ifd(data: bytes) -> tuple[str, dict[int, tuple[int, bytes]]]:
    """The first IFD's tags as (type, value bytes); refuses IFDs Pillow would spend seconds or
    hundreds of MB on (thousands of tags, arrays of millions of values)."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    if count > 1000:
        raise _Refused(f"TIFF of {count:,} tags in its first directory (a parsing bomb)")
    tags: dict[int, tuple[int, bytes]] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        size = n * _TIFF_SIZES.get(kind, 1)
        if size > _MAX_TIFF_TAG_BYTES:
            raise _Refused(f"TIFF whose tag {tag} holds {size:,} bytes (a parsing bomb)")
        if size > 4:
            (offset,) = struct.unpack(order + "I", entry[8:12])
            tags[tag] = (kind, data[offset : offset + size])
        else:
            tags[tag] = (kind, entry[8 : 8 + size])
    return order, tags


def _tiff_numbers(order: str, tag: tuple[int, bytes] | None) -> np.ndarray:
    kind, raw = tag or (0, b"")
    dtype = {3: "u2", 4: "u4", 16: "u8"}.get(kind)
    if dtype is None:
        return np.zeros(0, np.uint64)
    width = int(dtype[1])
    return np.frombuffer(raw[: len(raw) // width * width], order + dtype).astype(np.uint64)


def _tiff_claim(data: bytes) -> Claim:
    order, tags = _tiff_ifd(data)

    def first(tag: int, default: int) -> int:
        values = _tiff_numbers(order, tags.get(tag))
        return int(values[0]) if values.size else default

    width, height = first(256, 0), first(257, 0)
    samples, bits, compression = first(277, 1), max(first(258, 8), 1), first(259, 1)
    _check_tiff_compression(compression)
    per_plane = samples if first(284, 1) == 2 else 1
    if 322 in tags:
        bw, bh = max(first(322, 1), 1), max(first(323, 1), 1)
        counts = _tiff_numbers(order, tags.get(325))
        needed = math.ceil(width / bw) * math.ceil(height / bh) * per_plane
    else:
        bw, bh = width, max(min(first(278, height), height), 1)
        counts = _tiff_numbers(order, tags.get(279))
        needed = math.ceil(height / bh) * per_plane
    block = bw * bh * samples * bits // 8 // per_plane
    if not width or not height or not counts.size:
        return Claim(width, height)
    if counts.size < needed:
        raise _Refused(f"truncated TIFF: its {counts.size:,} strips or tiles cover a part of "
                       f"the {width}x{height} pixels its header claims ({needed:,} needed)")
    ratio = _TIFF_RATIO.get(compression)
    return Claim(width, height, data_bytes=min(int(counts.sum()), len(data)),
                 min_bytes=width * height * samples * bits // 8 // ratio if ratio else 0,
                 extra_bytes=block if compression != 1 else 0)


def _check_tiff_compression(compression: int) -> None:
    """A compression scheme Pillow has no codec for is named as such (it read as "corrupt or
    truncated TIFF (SyntaxError: 65000)")."""
    from PIL import TiffImagePlugin

    if compression not in TiffImagePlugin.COMPRESSION_INFO:
        raise _Refused(f"TIFF compressed with scheme {compression}, which imgrec cannot decode",
                       "save it as PNG or JPEG, or as a TIFF without compression or with LZW, "
                       "Deflate or JPEG compression")


def _webp_claim(data: bytes) -> Claim:
    kind = data[12:16]
    if kind == b"VP8X":
        w, h = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    elif kind == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    else:
        return Claim()
    # libwebp's frame and canvas buffers (RGBA, allocated when Pillow opens the file)
    return Claim(w, h, extra_bytes=12 * w * h)


_CLAIMS = {"JPEG": _jpeg_claim, "PNG": _png_claim, "GIF": _gif_claim, "BMP": _bmp_claim,
           "TIFF": _tiff_claim, "WEBP": _webp_claim}


# -- the limits ---------------------------------------------------------------------------------
def check_size(width: int, height: int, name: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an empty image, one over the pixel limit, or one of an extreme aspect ratio."""
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"{name}: the header says {width}x{height}: no pixels",
                              "re-export the image")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}",
            "resize the image (possible decompression bomb)",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ExtremeAspectRatio(
            f"{name}: {width}x{height} pixels is an aspect ratio of "
            f"{f'{ratio:,.1f}'.removesuffix('.0')}:1, over the "
            f"limit of {MAX_ASPECT_RATIO}:1",
            "crop the image to what should be classified",
        )


def _check_claim(claim: Claim, fmt: str, name: str) -> None:
    if 0 <= claim.data_bytes < claim.min_bytes:
        raise UnreadableImage(
            f"{name}: truncated {fmt}: its header claims {claim.width}x{claim.height} pixels, "
            f"but its {claim.data_bytes:,} bytes of image data cannot hold them (at least "
            f"{claim.min_bytes:,} needed)",
            "re-export or remove the file",
        )
    if claim.scan_work > MAX_SCAN_WORK:
        raise ImageTooLarge(
            f"{name}: a {claim.width}x{claim.height} JPEG of {claim.scan_work:,} block scans "
            f"is over the limit of {MAX_SCAN_WORK:,} (too many progressive scans)",
            "re-save it as a baseline JPEG")


_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


#: A decoded image whose 8-bit copy would take more than MAX_FULL_CONVERTED_BYTES (or more
#: than the memory budget leaves) is reduced as it is converted; smaller ones are converted
#: whole and resized by the contract exactly as they always were.
MAX_FULL_CONVERTED_BYTES = 64 * 2**20
#: ... and a reduced copy takes at most this much: a long thin image is reduced further than
#: REDUCING_GAP would, never below the size the caller needs.
MAX_CONVERTED_BYTES = 16 * 2**20


def _out_bytes(channels: int) -> int:
    return 1 if channels == 1 else 4  # Pillow keeps RGB in 4 bytes a pixel


def _plan(img: Image.Image, claim: Claim, need: tuple[int, int] | None, channels: int,
          name: str) -> int:
    """The factor the decoded image is reduced by as it is converted, after checking the
    decoder's memory from the header: the image at the scale it is decoded at (in Pillow's
    bytes per pixel), the decoder's own buffers, and the converted copy."""
    w, h = img.size
    decoding = w * h * _PIXEL_BYTES.get(img.mode, 4) + claim.extra_bytes
    full = w * h * _out_bytes(channels)
    factor = 1
    if need is not None and (full > MAX_FULL_CONVERTED_BYTES
                             or decoding + full > MAX_DECODE_BYTES):
        side = max(max(need), 1)
        by_memory = math.ceil(math.sqrt(full / MAX_CONVERTED_BYTES))
        factor = max(1, int(min(w, h) / side / REDUCING_GAP), min(by_memory, min(w, h) // side))
    total = decoding + math.ceil(w / factor) * math.ceil(h / factor) * _out_bytes(channels)
    if total > MAX_DECODE_BYTES:
        size = f"{claim.width or w}x{claim.height or h}"
        raise ImageTooLarge(
            f"{name}: decoding this {size} {img.format} takes {total / 2**20:,.0f} MB of "
            f"memory, over the limit of {MAX_DECODE_BYTES / 2**20:,.0f} MB",
            "resize the image",
        )
    return factor


# -- decoding -----------------------------------------------------------------------------------
def decode_image(
    source: str | Path | bytes,
    channels: int = 3,
    max_pixels: int = MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode a file or bytes into an 8-bit L (channels=1) or RGB (channels=3) image; its
    messages call it `name` (default: the path, or "upload" for bytes).

    `draft_size` is the smallest size the caller needs: a larger JPEG is decoded at reduced
    scale; an image too big to convert whole (see _plan) is reduced by an integer factor as it
    is converted, keeping at least REDUCING_GAP x draft_size. Raises UnreadableImage (or a
    subclass) with a message that names the problem; every limit is checked from the header,
    before decoding.
    """
    data, read_as = _read(source)
    name = name or read_as
    if not data:
        raise NotAnImage(f"{name}: empty file", _FORMATS_HINT)
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise NotAnImage(
            f"{name}: not an image (content is no JPEG, PNG, GIF, BMP, TIFF, WebP or binary "
            "PPM/PGM)",
            "give an image file",
        )
    try:
        claim = read_claim(data, fmt)
    except UnreadableImage as e:
        raise type(e)(f"{name}: {e.message}", e.hint) from None
    if claim.width or claim.height:
        check_size(claim.width, claim.height, name, max_pixels)
    _check_claim(claim, fmt, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, fmt, claim)
            return _decode(img, claim, channels, max_pixels, draft_size, name)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}", "resize the image") from None
    except Exception as e:  # Pillow raises many types for broken files
        raise UnreadableImage(
            f"{name}: corrupt or truncated {fmt} ({type(e).__name__}: {_without_reprs(e)})",
            "re-export or remove the file",
        ) from None


def _without_reprs(error: BaseException) -> str:
    """Pillow's message without object reprs (`<_io.BytesIO object at 0x...>`): a user, or
    an API client, needs the reason, not our memory addresses."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error)).strip() or "unreadable"


def _decode(img: ImageFile.ImageFile, claim: Claim, channels: int, max_pixels: int,
            draft_size: tuple[int, int] | None, name: str) -> Image.Image:
    check_size(*img.size, name, max_pixels)
    if draft_size is not None and img.format == "JPEG" and claim.draftable:
        img.draft("RGB" if channels == 3 else "L", draft_size)
    factor = _plan(img, claim, draft_size, channels, name)
    img.seek(0)  # first frame of an animation
    img.load()
    orientation = _orientation(img)
    out = _reduce_convert(img, channels, factor)
    if orientation is not None:
        out = out.transpose(orientation)
    return out


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The EXIF orientation's transpose (ImageOps.exif_transpose's table); a broken EXIF block
    is no reason to refuse the pixels."""
    try:
        value = img.getexif().get(0x0112)
    except Exception:
        return None
    return _TRANSPOSE.get(value) if isinstance(value, int) else None


_DEEP = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _value_range(img: Image.Image) -> tuple[float, float]:
    """Min and max of the finite values of a 32-bit (I or F) image, a strip at a time."""
    lo, hi = math.inf, -math.inf
    for strip in _strips(img, 1):
        arr = np.asarray(strip)
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 1.0)


def _to_8bit(img: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """16- and 32-bit greyscale to 8-bit by scaling, not clipping (Pillow's convert clips):
    16-bit by its top byte, 32-bit over `value_range` (the whole image's, default this one's)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint16 or img.mode.startswith("I;16"):
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    lo, hi = value_range or _value_range(img)
    arr = np.nan_to_num(arr.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    arr = np.clip((arr - lo) * (255.0 / (hi - lo or 1.0)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def _convert(img: Image.Image, channels: int,
             value_range: tuple[float, float] | None = None) -> Image.Image:
    mode = img.mode
    if mode in _DEEP:
        img = _to_8bit(img, value_range)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels become white, as they look in a browser on a white page.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        img = background
    if img.mode not in ("L", "RGB"):  # CMYK, LAB, HSV, YCbCr, 1: Pillow converts all to RGB
        img = img.convert("L" if img.mode == "1" else "RGB")
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _strips(img: Image.Image, factor: int):
    """Horizontal strips of about _STRIP_PIXELS, each a whole number of `factor` rows."""
    w, h = img.size
    rows = max(factor, _STRIP_PIXELS // max(w, 1) // factor * factor)
    for top in range(0, h, rows):
        yield img.crop((0, top, w, min(h, top + rows)))


def _reduce_convert(img: Image.Image, channels: int, factor: int) -> Image.Image:
    """_convert, and reduce by `factor`: for a big image a strip at a time, so no full-size
    copy of it (RGB from palette, white under alpha, 8 bits from 16) is ever made."""
    w, h = img.size
    if factor == 1 and w * h <= _STRIP_PIXELS:
        return _convert(img, channels)
    value_range = _value_range(img) if img.mode in ("I", "F") else None
    out = Image.new("L" if channels == 1 else "RGB",
                    (math.ceil(w / factor), math.ceil(h / factor)))
    top = 0
    for strip in _strips(img, factor):
        part = _convert(strip, channels, value_range)
        if factor > 1:
            part = part.reduce(factor)
        out.paste(part, (0, top))
        top += part.size[1]
    return out


def is_image_path(path: Path) -> bool:
    """Whether a file name looks like an image (used when listing folders)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


#: folder names that never hold a user's photos: macOS puts a zip's resource forks there
SKIPPED_FOLDERS = {"__MACOSX"}


def hidden(name: str) -> bool:
    """A name every folder listing leaves out (train, doctor, the label audit, predict DIR):
    `.DS_Store`, macOS's `._photo.jpg`, `.git/`, `__MACOSX/`."""
    return name.startswith(".") or name in SKIPPED_FOLDERS
