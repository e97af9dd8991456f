"""The training record beside a bundle: history.csv (one row per epoch) and curves.png.

Torch-free: training writes it, the report reads and draws it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .bundle import atomic_write_text
from .figures import save_figure


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    for row in history[1:]:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return v


def plot_curves(path: Path, history: list[dict], title: str = "") -> None:
    """Loss and accuracy per epoch, train vs validation (the workshop figure). Drawn on a
    bare matplotlib Figure, not through pyplot's global state, so any thread may draw it
    (training draws it in the background)."""
    if not history:
        return
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    staged = any(h.get("stage") for h in history)  # finetune: the warm-up's epochs first
    epochs = list(range(1, len(history) + 1)) if staged else [int(h["epoch"]) for h in history]
    warmup = sum(h.get("stage") == "warmup" for h in history)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        val = [h.get(f"val_{metric}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "s-", label="validation")
        ax.set_xlabel("epoch (head warm-up, then finetuning)" if staged else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        if warmup and warmup < len(history):
            ax.axvline(warmup + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(label.lower())
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=100)
