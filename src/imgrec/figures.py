"""Matplotlib, headless: every figure imgrec draws is made and saved through here."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100, tight: bool = True) -> Path:
    """Lay out, write atomically (creating the folder) and close a figure; returns its path."""
    import io

    from .bundle import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    buf.name = str(path)  # where these bytes go (matplotlib and readers of figures see it)
    with warnings.catch_warnings():  # a CJK file name in a title: boxes, not a warning each
        warnings.filterwarnings("ignore", message="Glyph .* missing from font",
                                category=UserWarning)
        if tight:
            fig.tight_layout()
        fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: release it
        pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a crash never leaves half a PNG
    return path
