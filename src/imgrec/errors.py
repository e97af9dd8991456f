"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2;
the server answers them as a 4xx JSON error. Each message says what is wrong and what to do."""

from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a service manager): handled as Ctrl-C is (training saves
    the best model so far, a new folder without work is removed); the command line then
    exits 143 (128 + SIGTERM)."""


def one_line(text: str) -> str:
    """`text` with its control characters written as escapes (a file name holding a newline
    would split its record, or an error, over two lines)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ImgrecError(Exception):
    """Base of every user-facing error: `message` says what is wrong, `hint` what to do."""

    exit_code = 2
    http_status = 400
    code = "bad_request"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if not self.hint:
            return self.message
        return f"{self.message}. {self.hint[:1].upper()}{self.hint[1:]}"


class DataError(ImgrecError):
    """A dataset that cannot be found, read or split."""

    code = "bad_data"


class ModelError(ImgrecError):
    """An unknown architecture, missing weights, or an unusable model."""

    code = "bad_model"


class BundleError(ImgrecError):
    """A bundle directory that is missing files, too new, or inconsistent."""

    code = "bad_bundle"


class InputError(ImgrecError):
    """An input given to predict/serve that cannot be used."""

    code = "bad_input"


class UnreadableImage(InputError):
    """Bytes that are not a decodable image (corrupt, truncated, not an image)."""

    http_status = 422
    code = "unreadable_image"


class NotAnImage(UnreadableImage):
    """Bytes whose content is no image format we know."""

    http_status = 415
    code = "unsupported_media_type"


class ImageTooLarge(UnreadableImage):
    """An image whose pixel count exceeds the limit (decompression-bomb guard)."""

    http_status = 413
    code = "image_too_large"


class ExtremeAspectRatio(UnreadableImage):
    """An image far longer than it is wide (or the reverse): over images.MAX_ASPECT_RATIO,
    refused from its header (a 200000 x 1 PNG is a hundred bytes)."""

    http_status = 422
    code = "extreme_aspect_ratio"


def skipped_report(skipped: dict[str, str]) -> str:
    """The end-of-run list of files that could not be read (training and evaluation never
    stop for one bad file; they say which ones they passed over, and why)."""
    lines = [f"skipped {len(skipped)} unreadable file(s):"]
    for path, reason in sorted(skipped.items()):
        lines.append(f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}")
    return "\n".join(lines)


class NotFound(ImgrecError):
    """No such thing (a studio project, class, image or model)."""

    http_status = 404
    code = "not_found"


class Conflict(ImgrecError):
    """The name exists already, or the thing is busy (a studio project training)."""

    http_status = 409
    code = "conflict"
