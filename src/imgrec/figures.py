"""Matplotlib, headless: every figure imgrec draws is made and saved through here."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def missing_glyphs_quiet() -> Iterator[None]:
    """Draw without matplotlib's warning for each character its font lacks (a class named
    in CJK or emoji): the figure shows boxes, the terminal stays clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font",
                                category=UserWarning)
        yield


def save_figure(fig: Any, path: str | Path, dpi: int = 100, tight: bool = True) -> Path:
    """Lay out, write atomically (creating the folder) and close a figure; returns its path."""
    import io

    from .bundle import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    buf.name = str(path)  # where these bytes go (matplotlib and readers of figures see it)
    with missing_glyphs_quiet():
        if tight:
            fig.tight_layout()
        fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: release it
        pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a crash never leaves half a PNG
    return path
