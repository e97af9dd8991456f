"""The workshops' seed networks, and imgrec's fast recipes for small images.

Each builder takes in_channels, num_classes and image_size (from the data) so the same name
works on MNIST, CIFAR-10 and a folder of photos alike.
"""

from __future__ import annotations

import torch
from torch import nn


def _flat_features(body: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, in_channels, image_size, image_size)).numel())


class Sequential(nn.Sequential):
    """nn.Sequential with a `features` / `classifier` split that explain.py can find."""

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(in_channels: int, num_classes: int, image_size: int, hidden: int = 512) -> nn.Module:
    """The workshop's dense network: Flatten, Dense 512 relu, Dropout 0.5, Dense n."""
    n_in = in_channels * image_size * image_size
    return Sequential(
        nn.Flatten(),
        nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        ),
    )


def cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64."""
    body = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),
        nn.Flatten(),
    )
    n = _flat_features(body, in_channels, image_size)
    return Sequential(
        body, nn.Sequential(nn.Linear(n, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))
    )


def cifar_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's CIFAR-10 CNN: two pairs of 3x3 conv blocks with pooling and dropout,
    Dense 512."""
    body = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(),
    )
    n = _flat_features(body, in_channels, image_size)
    return Sequential(
        body,
        nn.Sequential(
            nn.Linear(n, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
        ),
    )


def small_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's 150 px cats-vs-dogs CNN: three Conv-ReLU-Pool blocks, Dense 256.
    (A softmax over two classes is the workshop's sigmoid unit.)"""
    body = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_features(body, in_channels, image_size)
    return Sequential(
        body,
        nn.Sequential(
            nn.Linear(n, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes)
        ),
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def fast_cnn(
    in_channels: int, num_classes: int, image_size: int, width: int = 16, depth: int = 3,
    grid: int = 1,
) -> nn.Module:
    """imgrec's fast small-image net (the default recipe for MNIST-sized data): stages of
    conv -> max-pool -> BatchNorm -> ReLU that double the width and halve the resolution, then
    global max pooling and one linear layer. Pooling before BatchNorm and ReLU (as airbench
    does) runs them on a quarter of the pixels, which halves a CPU training step; BatchNorm and
    the one-cycle schedule let it converge in a few epochs."""
    layers: list[nn.Module] = []
    c = in_channels
    for i in range(depth):
        out = width * 2 ** min(i, 2)
        layers.append(nn.Conv2d(c, out, 3, padding=1, bias=False))
        if i < depth - 1:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    side = image_size // 2 ** (depth - 1)  # the last stage's feature-map side
    layers += [grid_max_pool(side, grid), nn.Flatten()]
    return Sequential(nn.Sequential(*layers), nn.Linear(c * grid * grid, num_classes))


def _adaptive_bins(side: int, grid: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins: [floor(i*side/grid), ceil((i+1)*side/grid))."""
    return [(i * side // grid, -(-(i + 1) * side // grid)) for i in range(grid)]


class GridMaxPool(nn.Module):
    """AdaptiveMaxPool2d(grid) for a feature map of a known side, written as slices and
    maxima that ONNX exports: adaptive pooling with uneven bins has no ONNX operator."""

    def __init__(self, side: int, grid: int):
        super().__init__()
        self.bins = _adaptive_bins(side, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [x[:, :, a:b].amax(dim=2, keepdim=True) for a, b in self.bins]
        x = torch.cat(rows, dim=2)
        cols = [x[..., a:b].amax(dim=3, keepdim=True) for a, b in self.bins]
        return torch.cat(cols, dim=3)


def grid_max_pool(side: int, grid: int) -> nn.Module:
    """Max pooling of a side x side map to grid x grid, equal to AdaptiveMaxPool2d(grid) and
    exportable to ONNX: a plain MaxPool2d when the adaptive bins are even (7 -> 3 is kernel 3,
    stride 2: MNIST's fast-cnn), else GridMaxPool."""
    if grid == 1 or side <= 0:
        return nn.AdaptiveMaxPool2d(grid)  # global pooling exports as GlobalMaxPool
    bins = _adaptive_bins(side, grid)
    kernel = bins[0][1] - bins[0][0]
    stride = bins[1][0] - bins[0][0] if grid > 1 else kernel
    if all(b - a == kernel and a == i * stride for i, (a, b) in enumerate(bins)):
        return nn.MaxPool2d(kernel, stride)
    return GridMaxPool(side, grid)


def res_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> nn.Module:
    """A small residual net in the airbench style for 32 px colour images (CIFAR-10)."""

    class Res(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    w = width
    features = nn.Sequential(
        _conv_bn(in_channels, w),
        _conv_bn(w, 2 * w), nn.MaxPool2d(2), Res(2 * w),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Res(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
    )
    return Sequential(features, nn.Linear(8 * w, num_classes))
