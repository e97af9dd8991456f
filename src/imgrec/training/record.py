"""The training record written beside the bundle: history.csv, curves.png, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from ..figures import pyplot, save_figure


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    for row in history[1:]:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


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
    """Loss and accuracy per epoch, train vs validation (the workshop figure)."""
    if not history:
        return
    plt = pyplot()

    epochs = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        val = [h.get(f"val_{metric}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=100)


class TensorBoard:
    """Scalars per epoch (losses, accuracies, the learning rate), a sample batch of training
    images as the model sees them (after augmentation), and the validation confusion matrix
    per epoch; created lazily so a run without it pays no import."""

    #: more classes than this and the per-epoch confusion image is skipped (unreadable, slow)
    MAX_CONFUSION_CLASSES = 50

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.has_batch = False

    def sample_batch(self, x, y, classes: list[str], step: int = 0, limit: int = 32) -> None:
        """x: float N x C x H x W with pixel values 0..255 (augmented, not yet normalised)."""
        k = min(limit, len(x))
        imgs = (x[:k].detach().float().cpu() / 255.0).clamp(0, 1)
        self.writer.add_images("train/sample_batch", imgs, step, dataformats="NCHW")
        labels = [classes[int(i)] for i in y[:k].tolist()]
        self.writer.add_text("train/sample_batch_labels",
                             ", ".join(f"{i}: {lab}" for i, lab in enumerate(labels)), step)
        self.has_batch = True

    def confusion(self, cm, classes: list[str], step: int) -> None:
        """The validation confusion matrix as an image (rows true, columns predicted)."""
        if cm is None or len(classes) > self.MAX_CONFUSION_CLASSES:
            return
        plt = pyplot()

        n = len(classes)
        size = min(12, max(4, 0.45 * n + 2))
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Validation confusion matrix, epoch {step}")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.tight_layout()
        self.writer.add_figure("val/confusion_matrix", fig, step, close=True)

    def epoch(self, row: dict) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                group, _, name = key.partition("_")
                tag = f"{name or group}/{group}" if name else key
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
