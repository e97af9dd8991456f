"""TensorBoard logging for a training run (history.csv and curves.png: imgrec.history)."""

from __future__ import annotations

from pathlib import Path

from ..figures import pyplot


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
