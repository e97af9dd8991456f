"""The workshops' seed networks, and imgrec's fast recipes for small images.

Each builder takes in_channels, num_classes and image_size (from the data) so the same name
works on MNIST, CIFAR-10 and a folder of photos alike.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from .registry import register_model


def _flat_features(body: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, in_channels, image_size, image_size)).numel())


def _run(layers, x: torch.Tensor) -> torch.Tensor:
    """Apply layers in turn (a slice of a Sequential without building a new one per call)."""
    for layer in layers:
        x = layer(x)
    return x


class ScratchNet(nn.Sequential):
    """`features` then `classifier` (the state-dict keys every bundle holds), with timm's
    interface so explain, export and training treat it like any timm model:
    forward_features is features[:head_start], the last feature map before pooling or
    flattening (Grad-CAM's target); forward_head pools/flattens (features[head_start:]), runs
    the hidden layers of the classifier (pre_logits) and its final Linear."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module, head_start: int):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.head_start = head_start
        final = self.get_classifier()
        self.head_hidden_size = final.in_features if isinstance(final, nn.Linear) else 0
        self.num_classes = final.out_features if isinstance(final, nn.Linear) else 0
        convs = [m for m in features[:head_start].modules() if isinstance(m, nn.Conv2d)]
        #: channels of forward_features' output (its width for a dense net)
        self.num_features = convs[-1].out_channels if convs else 0
        if not convs and isinstance(classifier, nn.Sequential):
            self.num_features = classifier[0].in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return _run(islice(self.features, self.head_start), x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = _run(islice(self.features, self.head_start, None), x)
        if isinstance(self.classifier, nn.Sequential):
            x = _run(islice(self.classifier, len(self.classifier) - 1), x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final Linear (the whole classifier of the fast nets)."""
        c = self.classifier
        return c[-1] if isinstance(c, nn.Sequential) else c

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final Linear for num_classes (0: none, the pre-logits come out), at the same
        state-dict key."""
        new = (nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0
               else nn.Identity())
        if isinstance(self.classifier, nn.Sequential):
            self.classifier[-1] = new  # keeps its index: classifier.3.weight stays
        else:
            self.classifier = new
        self.num_classes = num_classes


@register_model(summary="workshop dense net: Dense 512 relu, dropout 0.5", default_size=28)
def mlp(in_channels: int, num_classes: int, image_size: int, hidden: int = 512) -> nn.Module:
    """The workshop's dense network: Flatten, Dense 512 relu, Dropout 0.5, Dense n.
    forward_features is the image itself: there is no feature map to explain."""
    n_in = in_channels * image_size * image_size
    classifier = nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    return ScratchNet(nn.Sequential(nn.Flatten()), classifier, head_start=0)


def _with_head(stages: list[nn.Module], num_classes: int, in_channels: int, image_size: int,
               hidden: int, dropout: float = 0.0) -> ScratchNet:
    """features = the conv stages + Flatten; classifier = Dense `hidden` relu (+ dropout),
    Dense n, its input width measured on a dummy image (layers built in the order earlier
    versions built them, so a seed gives the same initial weights)."""
    features = nn.Sequential(*stages, nn.Flatten())
    n = _flat_features(features, in_channels, image_size)
    layers = [nn.Linear(n, hidden), nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    classifier = nn.Sequential(*layers, nn.Linear(hidden, num_classes))
    return ScratchNet(features, classifier, head_start=len(stages))


@register_model(summary="workshop MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64",
                default_size=28)
def cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64."""
    stages = [
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),
    ]
    return _with_head(stages, num_classes, in_channels, image_size, hidden=64)


@register_model("cifar-cnn", summary="workshop CIFAR-10 CNN: 2x(Conv-Conv-Pool-Dropout), "
                "Dense 512", default_size=32, aliases=("cifar_cnn",))
def cifar_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's CIFAR-10 CNN: two pairs of 3x3 conv blocks with pooling and dropout,
    Dense 512."""
    stages = [
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25),
    ]
    return _with_head(stages, num_classes, in_channels, image_size, hidden=512, dropout=0.5)


@register_model("small-cnn", summary="workshop cats-vs-dogs CNN: 3x(Conv-ReLU-Pool), Dense 256",
                default_size=150, aliases=("small_cnn",))
def small_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The workshop's 150 px cats-vs-dogs CNN: three Conv-ReLU-Pool blocks, Dense 256.
    (A softmax over two classes is the workshop's sigmoid unit.)"""
    stages = [
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    ]
    return _with_head(stages, num_classes, in_channels, image_size, hidden=256, dropout=0.5)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@register_model("fast-cnn", summary="imgrec's fast conv-BN net for small images (MNIST default)",
                default_size=28, aliases=("fast_cnn",))
def fast_cnn(
    in_channels: int, num_classes: int, image_size: int, width: int = 16, depth: int = 3,
    grid: int = 1, stem: str = "pool", stem_width: int | None = None,
) -> nn.Module:
    """imgrec's fast small-image net (the default recipe for MNIST-sized data): stages of
    conv -> max-pool -> BatchNorm -> ReLU that double the width and halve the resolution, then
    max pooling to a grid x grid map (1: global; the map's own side: none) and one linear
    layer. Pooling before BatchNorm and ReLU (as airbench
    does) runs them on a quarter of the pixels, which halves a CPU training step; BatchNorm and
    the one-cycle schedule let it converge in a few epochs.

    stem "pool": the first stage convolves at full resolution and max-pools, as the others do.
    stem "space-to-depth": it folds each 2x2 block of pixels into channels first
    (PixelUnshuffle) and convolves at half resolution (a 6x6 receptive field, stride 2), which
    skips the full-resolution feature map, the costliest tensor of a step. stem_width: the
    first stage's width (default `width`)."""
    if stem not in FAST_CNN_STEMS:
        raise ValueError(f"fast-cnn stem must be one of {', '.join(FAST_CNN_STEMS)}, not {stem!r}")
    layers: list[nn.Module] = []
    c = in_channels
    for i in range(depth):
        out = stem_width if i == 0 and stem_width else width * 2 ** min(i, 2)
        if i == 0 and stem == "space-to-depth":
            if image_size % 2:  # an odd side: repeat the last row and column to fold 2x2 blocks
                layers.append(nn.ReplicationPad2d((0, 1, 0, 1)))
            layers += [nn.PixelUnshuffle(2), nn.Conv2d(4 * c, out, 3, padding=1, bias=False)]
        else:
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=False))
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    # the last stage's feature-map side: every stage but the last max-pools, except a
    # space-to-depth first stage, which halves (rounding up) by folding instead
    folded = stem == "space-to-depth"
    side = -(-image_size // 2) if folded else image_size
    for _ in range(depth - 1 - folded):
        side //= 2
    features = nn.Sequential(*layers, grid_max_pool(side, grid), nn.Flatten())
    return ScratchNet(features, nn.Linear(c * grid * grid, num_classes), len(layers))


#: fast-cnn's first stages: full-resolution conv + max-pool, or space-to-depth + conv
FAST_CNN_STEMS = ("pool", "space-to-depth")


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
    if grid == side:  # one-pixel bins: the map itself (MNIST's fast-cnn flattens its 6x6)
        return nn.Identity()
    bins = _adaptive_bins(side, grid)
    kernel = bins[0][1] - bins[0][0]
    stride = bins[1][0] - bins[0][0] if grid > 1 else kernel
    if all(b - a == kernel and a == i * stride for i, (a, b) in enumerate(bins)):
        return nn.MaxPool2d(kernel, stride)
    return GridMaxPool(side, grid)


class Residual(nn.Module):
    """x + two conv-BN-ReLU blocks (airbench's residual unit)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register_model("res-cnn", summary="imgrec's small residual net for 32 px colour (CIFAR default)",
                default_size=32, aliases=("res_cnn",))
def res_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> nn.Module:
    """A small residual net in the airbench style for 32 px colour images (CIFAR-10)."""
    w = width
    stages = [
        _conv_bn(in_channels, w),
        _conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
    ]
    features = nn.Sequential(*stages, nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return ScratchNet(features, nn.Linear(8 * w, num_classes), len(stages))
