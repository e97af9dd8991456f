"""The workshops' convolution demonstration on any image: classic 3x3 kernels (smoothing,
horizontal edge, vertical edge, all edges) slid over the image with torch's conv2d, valid vs
same padding, stride 1 vs 2, and 2x2 max pooling — with every output size printed, in one
figure. The image comes in through images.decode_image, the one decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .figures import drawing, save_figure
from .images import decode_image

KERNELS: dict[str, np.ndarray] = {
    "smoothing (3x3 box blur)": np.full((3, 3), 1 / 9, np.float32),
    "horizontal edges (Sobel y)": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32),
    "vertical edges (Sobel x)": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32),
    "all edges (Laplacian)": np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32),
}


@dataclass
class Demo:
    image: np.ndarray  # float32 H x W in [0, 1]
    outputs: dict[str, np.ndarray]  # name -> 2-D result
    sizes: list[tuple[str, tuple[int, int]]]  # (operation, (height, width)) in order


def out_size(n: int, k: int, padding: int, stride: int) -> int:
    """The convolution output size formula the workshops teach: (n + 2p - k) // s + 1."""
    return (n + 2 * padding - k) // stride + 1


def run(image: str | Path, max_side: int = 256) -> Demo:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    img = decode_image(image, channels=1)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # display size, not a model
    if min(img.size) < 3:
        raise InputError(f"{image}: {img.width}x{img.height} pixels (at most {max_side} on a "
                         "side) is too small for a 3x3 kernel",
                         "give an image at least 3 pixels on each side, not a thin strip")
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None, None]
    h, w = x.shape[-2:]
    outputs: dict[str, np.ndarray] = {}
    sizes: list[tuple[str, tuple[int, int]]] = [("input", (h, w))]
    for name, k in KERNELS.items():
        y = F.conv2d(x, torch.from_numpy(k)[None, None], padding=1)  # same
        outputs[name] = y[0, 0].numpy()
    edge = torch.from_numpy(KERNELS["all edges (Laplacian)"])[None, None]
    for label, padding, stride in (("valid padding, stride 1", 0, 1),
                                   ("same padding, stride 1", 1, 1),
                                   ("valid padding, stride 2", 0, 2),
                                   ("same padding, stride 2", 1, 2)):
        y = F.conv2d(x, edge, padding=padding, stride=stride)[0, 0]
        outputs[f"Laplacian, {label}"] = y.numpy()
        sizes.append((f"3x3 conv, {label}", tuple(y.shape)))
    relu = F.relu(F.conv2d(x, edge, padding=1))
    pooled = F.max_pool2d(relu, 2)[0, 0]
    outputs["ReLU then 2x2 max pooling"] = pooled.numpy()
    sizes.append(("ReLU + 2x2 max pooling (stride 2)", tuple(pooled.shape)))
    return Demo(x[0, 0].numpy(), outputs, [(n, (int(a), int(b))) for n, (a, b) in sizes])


def plot(demo: Demo, path: Path, title: str = "") -> Path:
    plt = drawing()

    names = list(demo.outputs)
    kernel_names = list(KERNELS)
    fig, axes = plt.subplots(3, 5, figsize=(20, 12.5))
    h, w = demo.image.shape

    def show(ax, img, name, cmap="gray"):
        ax.imshow(img, cmap=cmap)
        ax.set_title(f"{name}\n{img.shape[0]}x{img.shape[1]}", fontsize=9)
        ax.set_xlabel("x (pixels)", fontsize=8)
        ax.set_ylabel("y (pixels)", fontsize=8)

    # row 0: input + the four kernels as matrices
    show(axes[0, 0], demo.image, "input (greyscale)")
    for ax, name in zip(axes[0, 1:], kernel_names, strict=True):
        k = KERNELS[name]
        ax.imshow(k, cmap="coolwarm", vmin=-2, vmax=2)
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{k[i, j]:.2g}", ha="center", va="center", fontsize=10)
        ax.set_title(f"kernel: {name}", fontsize=9)
        ax.set_xlabel("kernel column")
        ax.set_ylabel("kernel row")
        ax.set_xticks(range(3))
        ax.set_yticks(range(3))
    # row 1: each kernel's output (same padding, stride 1)
    show(axes[1, 0], demo.image, "input")
    for ax, name in zip(axes[1, 1:], kernel_names, strict=True):
        show(ax, demo.outputs[name], f"{name}, same padding")
    # row 2: padding, stride and pooling on the all-edges kernel
    show(axes[2, 0], demo.outputs["Laplacian, valid padding, stride 1"],
         "Laplacian, valid padding, stride 1")
    for ax, name in zip(axes[2, 1:], [n for n in names if n.startswith(("Laplacian, same",
                                                                        "Laplacian, valid padding,"
                                                                        " stride 2", "ReLU"))],
                        strict=False):
        show(ax, demo.outputs[name], name)
    fig.suptitle(title or f"Convolution demo on a {h}x{w} image: kernels, padding, stride, "
                          "pooling (output sizes under each title)", fontsize=13)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=0.91, wspace=0.3, hspace=0.45)
    save_figure(fig, path, dpi=80, tight=False)
    return path
