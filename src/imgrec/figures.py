"""Matplotlib, headless: every figure imgrec draws is made and saved through here."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot, for code that needs it (Optuna's figures): on the Agg backend when
    this process has not imported pyplot yet (no display needed), else on the backend it
    has, which a notebook's inline plots need (switching it to Agg stopped them)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def agg_pyplot() -> Iterator[Any]:
    """pyplot on an Agg-based backend for the block (Optuna's importance figure measures its
    labels with the canvas's renderer, which the svg and pdf backends lack: with a caller's
    svg backend it failed), the caller's backend back afterwards."""
    plt = pyplot()
    backend = plt.get_backend()
    renders = "agg" in backend.lower() or "inline" in backend.lower()
    if not renders:
        plt.switch_backend("Agg")
    try:
        yield plt
    finally:
        if not renders:
            plt.switch_backend(backend)


#: Figure's own options; subplots' other options go to Figure.subplots
_FIGURE_OPTIONS = ("figsize", "dpi", "facecolor", "layout")


class Drawing:
    """What imgrec draws with: bare matplotlib Figures, as pyplot.subplots would give, with no
    global backend or figure registry, so any thread may draw and a notebook's pyplot (its
    backend, its open figures) is left alone."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, **options: Any) -> tuple[Any, Any]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(**{k: options.pop(k) for k in _FIGURE_OPTIONS if k in options})
        FigureCanvasAgg(fig)  # the canvas that renders it (and measures text) in memory
        return fig, fig.subplots(nrows, ncols, **options)

    @staticmethod
    def get_cmap(name: str) -> Any:
        import matplotlib

        return matplotlib.colormaps[name]


def drawing() -> Drawing:
    return Drawing()


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
