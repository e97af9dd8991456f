"""`imgrec preview DATA`: look at the data before training on it — a grid of samples per
class, and the same images after the training augmentation (imgrec.augment.Augment), so the
workshops' "is my ImageDataGenerator sensible?" check is one command. Images go through the
preprocessing contract (contract.load_input / fit_arrays), as in training."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from .contract import Preprocess, fit_arrays, load_input
from .data.datasets import load_dataset
from .errors import DataError, ImgrecError
from .figures import drawing, save_figure


def sample(data: str, per_class: int = 6, image_size: int | None = None, seed: int = 0,
           data_dir: str | None = None, max_classes: int = 12):
    """(classes shown, uint8 images K x N x C x H x W, images per row, dataset) from the
    training split; a class with fewer than N images is padded with black slots that its
    count leaves out (the figure draws them blank)."""
    ds = load_dataset(data, data_dir, seed=seed)
    split = ds.splits["train"]
    size = image_size or ds.native_size or 128
    contract = Preprocess(input_size=size, channels=ds.channels, mean=(0.5,) * ds.channels,
                          std=(0.5,) * ds.channels)
    rng = np.random.default_rng(seed)
    shown, rows, counts = [], [], []
    for c, name in enumerate(ds.classes[:max_classes]):
        idx = np.flatnonzero(split.labels == c)
        rng.shuffle(idx)
        imgs = []
        for i in idx:
            if len(imgs) == per_class:
                break
            if split.images is not None:
                imgs.append(fit_arrays(split.images[i : i + 1], contract)[0])
                continue
            try:
                imgs.append(load_input(split.paths[i], contract, "no"))
            except ImgrecError:
                continue  # `imgrec doctor` reports unreadable files
        if imgs:
            counts.append(len(imgs))
            while len(imgs) < per_class:
                imgs.append(np.zeros_like(imgs[0]))
            shown.append(name)
            rows.append(np.stack(imgs))
    if not rows:
        raise DataError(f"{data}: no readable training image to preview")
    return shown, np.stack(rows), counts, ds


def preview(data: str, out: Path, augment: str = "standard", per_class: int = 6,
            image_size: int | None = None, seed: int = 0, data_dir: str | None = None) -> Path:
    """Write the figure: originals on the left, the same images augmented on the right."""
    import torch

    from .augment import Augment

    plt = drawing()

    aug = Augment.parse(augment)
    classes, imgs, counts, ds = sample(data, per_class, image_size, seed, data_dir)
    imgs = imgs[:, : max(counts)]  # every class has fewer: no column that is all blanks
    k, n, c, h, w = imgs.shape
    torch.manual_seed(seed)
    flat = torch.from_numpy(imgs.reshape(k * n, c, h, w)).float()
    augmented = aug(flat).round().clamp(0, 255).to(torch.uint8).numpy().reshape(imgs.shape)
    fig, axes = plt.subplots(k, 2 * n, figsize=(1.35 * 2 * n, 1.45 * k + 0.8), squeeze=False)
    for r in range(k):
        for j in range(2 * n):
            ax = axes[r, j]
            if j % n >= counts[r]:  # the class has no more training images
                ax.axis("off")
                continue
            src = imgs if j < n else augmented
            img = src[r, j % n].transpose(1, 2, 0)
            ax.imshow(img[:, :, 0] if c == 1 else img, cmap="gray" if c == 1 else None,
                      vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{'original' if j < n else 'augmented'} {j % n + 1}", fontsize=6)
            ax.set_xlabel(f"x ({w} px)", fontsize=5)
            ax.set_ylabel(classes[r] if j in (0, n) else f"y ({h} px)",
                          fontsize=8 if j in (0, n) else 5)
    more = f" (first {k} of {len(ds.classes)} classes)" if len(ds.classes) > k else ""
    fewer = "" if min(counts) == n else " (fewer where a class has fewer)"
    title = (f"{ds.name}: {n} training images per class{fewer}{more}; left as loaded, right "
             f"after augmentation '{aug.describe()}'")
    # wrapped to the figure's width (~11 characters an inch at 10 pt): a long augmentation
    # string was cut off at both sides
    fig.suptitle(textwrap.fill(title, max(40, int(11 * 1.35 * 2 * n))), fontsize=10)
    save_figure(fig, out, dpi=100)
    return out
