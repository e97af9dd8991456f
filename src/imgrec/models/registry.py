"""Name -> builder. Built-in workshop networks, imgrec's fast recipes, offline pretrained
EfficientNet-Lite, and any timm architecture name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..errors import ModelError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    summary: str
    builder: Callable
    default_size: int | None = None  # for folder data; in-memory data keeps its own size


def _scratch(fn_name: str) -> Callable:
    def build(**kw):
        from . import scratch

        return getattr(scratch, fn_name)(**kw)

    return build


def _lite(name: str) -> Callable:
    def build(**kw):
        from .pretrained import build_efficientnet_lite

        return build_efficientnet_lite(name, **kw)

    return build


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo("mlp", "workshop dense net: Dense 512 relu, dropout 0.5", _scratch("mlp"), 28),
    "cnn": ModelInfo("cnn", "workshop MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64",
                     _scratch("cnn"), 28),
    "cifar-cnn": ModelInfo("cifar-cnn",
                           "workshop CIFAR-10 CNN: 2x(Conv-Conv-Pool-Dropout), Dense 512",
                           _scratch("cifar_cnn"), 32),
    "small-cnn": ModelInfo("small-cnn", "workshop cats-vs-dogs CNN: 3x(Conv-ReLU-Pool), Dense 256",
                           _scratch("small_cnn"), 150),
    "fast-cnn": ModelInfo("fast-cnn", "imgrec's fast conv-BN net for small images (MNIST default)",
                          _scratch("fast_cnn"), 28),
    "res-cnn": ModelInfo("res-cnn", "imgrec's small residual net for 32 px colour (CIFAR default)",
                         _scratch("res_cnn"), 32),
}
for _n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    MODELS[_n] = ModelInfo(_n, f"EfficientNet-{_n[-5:].title()} (timm), ImageNet weights offline",
                           _lite(_n), None)


def _transfer(**kw):
    from .pretrained import TransferNet

    return TransferNet(**kw)


MODELS["transfer"] = ModelInfo("transfer", "a pretrained backbone + a new MLP head "
                               "(written by --mode features/finetune --head mlp)", _transfer, None)

ALIASES = {"imagenet": "efficientnet_lite0", "efficientnet-lite0": "efficientnet_lite0",
           "efficientnet-lite1": "efficientnet_lite1", "efficientnet-lite2": "efficientnet_lite2",
           "small_cnn": "small-cnn", "cifar_cnn": "cifar-cnn", "fast_cnn": "fast-cnn",
           "res_cnn": "res-cnn"}

#: The workshops' Keras MobileNet(alpha=...) / VGG16 / Xception choices -> timm variants
#: (docs/transfer.md); the resolution is --image-size.
WORKSHOP_ALIASES = {
    "mobilenet": "mobilenetv2_100", "mobilenet_1.0": "mobilenetv2_100",
    "mobilenet_0.75": "mobilenetv2_075", "mobilenet_0.5": "mobilenetv2_050",
    "mobilenet_0.35": "mobilenetv2_035", "mobilenetv2": "mobilenetv2_100",
    "mobilenet_v2": "mobilenetv2_100", "mobilenetv3": "mobilenetv3_large_100",
    "mobilenet_v3": "mobilenetv3_large_100", "mobilenetv3_large": "mobilenetv3_large_100",
    "mobilenetv3_small": "mobilenetv3_small_100", "mobilenet_v1": "mobilenetv1_100",
    "xception": "legacy_xception", "vgg": "vgg16",
}
ALIASES.update(WORKSHOP_ALIASES)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def resolve_model_name(name: str) -> str:
    """A registry or timm name, or a ModelError listing the close matches."""
    name = ALIASES.get(name, ALIASES.get(name.lower().replace("-", "_"), name))
    if name in MODELS:
        return name
    timm_names = _timm_names()
    if name in timm_names:
        return name
    close = difflib.get_close_matches(name, list(MODELS) + timm_names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run `imgrec models` to list them"
    raise ModelError(f"unknown model {name!r}", hint)


def build_model(name: str, **kwargs):
    """Build a network by registry or timm name. kwargs: in_channels, num_classes,
    image_size, and any builder-specific ones."""
    name = resolve_model_name(name)
    if name in MODELS:
        return MODELS[name].builder(**kwargs)
    import timm

    in_channels = kwargs.pop("in_channels", 3)
    num_classes = kwargs.pop("num_classes", 1000)
    kwargs.pop("image_size", None)
    kwargs.pop("pretrained", None)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot build {name}: {e}") from None


def describe_models() -> list[tuple[str, str]]:
    rows = [(info.name, info.summary) for info in MODELS.values()]
    rows.append(("<timm name>", "any timm architecture, e.g. resnet18, mobilenetv3_small_100"))
    return rows


__all__ = ["MODELS", "ALIASES", "build_model", "resolve_model_name", "describe_models", "partial"]
