"""See what a network looks at: Grad-CAM heatmaps, feature maps of each convolutional stage,
and the first layer's learned kernels.

Reads only the bundle (zoo.open_bundle + network.load_model) and turns an image into model
input only through the preprocessing contract (contract.load_input), so the heatmap is drawn
over exactly the pixels the model saw. The layer Grad-CAM hooks is found generically: timm
networks expose `forward_features` / `forward_head` (the last feature map before global
pooling); imgrec's scratch networks expose `.features` / `.classifier`, where the target is the
last spatial (H x W > 1) output before pooling or flattening.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .contract import load_input
from .errors import InputError, ModelError
from .figures import pyplot, save_figure
from .network import load_model
from .zoo import open_bundle


# -- finding the layers ----------------------------------------------------------------------
def _is_act(m: Any) -> bool:
    from torch import nn

    acts = nn.ReLU | nn.ReLU6 | nn.GELU | nn.SiLU | nn.LeakyReLU | nn.ELU | nn.Hardswish
    return isinstance(m, acts)


def _has_conv(m: Any) -> bool:
    from torch import nn

    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _is_timm(model: Any) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head")


def _scratch_stages(model: Any) -> list[tuple[str, Any]]:
    """(name, module) whose outputs are the activations of each conv stage of a `.features`
    network: a conv block's own output, or the activation right after a bare conv."""
    from torch import nn

    children = list(model.features.named_children())
    stages = []
    for i, (name, child) in enumerate(children):
        if not _has_conv(child):
            continue
        if isinstance(child, nn.Conv2d) and i + 1 < len(children) and _is_act(children[i + 1][1]):
            stages.append((f"features.{children[i + 1][0]}", children[i + 1][1]))
        else:
            stages.append((f"features.{name}", child))
    return stages


def conv_stages(model: Any) -> list[tuple[str, Any]]:
    """The modules whose outputs are the per-stage activation maps (the workshop figure)."""
    if hasattr(model, "features") and hasattr(model, "classifier") and not _is_timm(model):
        stages = _scratch_stages(model)
    elif _is_timm(model):
        stages = []
        for name in ("conv_stem", "stem"):
            if hasattr(model, name):
                stages.append((name, getattr(model, name)))
                break
        blocks = getattr(model, "blocks", None) or getattr(model, "stages", None) or \
            getattr(model, "layers", None)
        if blocks is not None:
            stages += [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
        if hasattr(model, "conv_head"):
            stages.append(("conv_head", model.conv_head))
    else:
        stages = []
    if not stages:
        raise ModelError(f"cannot find convolutional stages in {type(model).__name__}",
                         "explain works on CNNs (imgrec's conv nets and timm CNNs)")
    return stages


@dataclass
class Explanation:
    """A Grad-CAM result: heatmap in [0, 1] over the model's input pixels."""

    pixels: np.ndarray  # uint8 C x H x W, the contract's view of the image
    heatmap: np.ndarray  # float32 H x W in [0, 1]
    raw: np.ndarray  # float32 h x w, the unnormalised CAM at feature-map resolution
    probs: np.ndarray  # class probabilities (bundle temperature applied)
    class_index: int
    class_name: str
    layer: str
    classes: list[str]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        return [(self.classes[i], float(self.probs[i])) for i in np.argsort(-self.probs)[:k]]


class Explainer:
    """Load a bundle's network once and explain many images."""

    def __init__(self, bundle: Bundle | str | Path, device: str | None = None):
        import torch

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle,
                                                                            need_weights=True)
        if not self.bundle.weights_path.is_file():
            raise ModelError(f"{self.bundle.path}: explain needs model.safetensors "
                             "(an ONNX-only bundle has no gradients)")
        self.torch = torch
        self.device = torch.device(device or "cpu")
        self.model = load_model(self.bundle).to(self.device).float().eval()
        for m in self.model.modules():  # in-place activations would clobber hooked outputs
            if hasattr(m, "inplace"):
                m.inplace = False
        self.classes = self.bundle.classes

    # -- inputs ----------------------------------------------------------------------------
    def prepare(self, source: Any) -> np.ndarray:
        """File path, bytes or a uint8 C x H x W array -> uint8 C x H x W through the contract."""
        if isinstance(source, np.ndarray):
            return source
        return load_input(source, self.bundle.preprocess)

    def _tensor(self, pixels: np.ndarray):
        x = self.bundle.preprocess.normalize(pixels[None].astype(np.uint8))
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def class_index(self, name: str | int | None, probs: np.ndarray) -> int:
        """A class by index, exact name or synonym (ImageNet names list several), or unique
        substring; None is the top class."""
        if name is None:
            return int(probs.argmax())
        if isinstance(name, int) or str(name).isdigit():
            i = int(name)
            if 0 <= i < len(self.classes):
                return i
            raise InputError(f"class index {i} is out of range (0..{len(self.classes) - 1})")
        key = str(name).strip().lower()
        for i, c in enumerate(self.classes):
            if key == c.lower() or key in [s.strip().lower() for s in c.split(",")]:
                return i
        hits = [i for i, c in enumerate(self.classes) if key in c.lower()]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise InputError(f"class {name!r} is ambiguous",
                             "one of: " + "; ".join(self.classes[i] for i in hits[:8]))
        import difflib

        close = difflib.get_close_matches(key, [c.lower() for c in self.classes], n=3)
        raise InputError(f"the model has no class {name!r}",
                         f"did you mean {', '.join(close)}?" if close else
                         f"its classes: {', '.join(self.classes[:10])}")

    # -- Grad-CAM --------------------------------------------------------------------------
    def gradcam(self, source: Any, target: str | int | None = None) -> Explanation:
        """Grad-CAM (Selvaraju et al. 2017) for `target` (default: the top class): the last
        conv stage's channels weighted by the mean gradient of the class score, ReLU."""
        from .predict import softmax

        torch = self.torch
        pixels = self.prepare(source)
        x = self._tensor(pixels)
        with torch.enable_grad():
            logits, feats, layer = self._forward_keep_features(x)
            probs = softmax(logits.detach().float().cpu().numpy(), self.bundle.temperature)[0]
            idx = self.class_index(target, probs)
            self.model.zero_grad(set_to_none=True)
            logits[0, idx].backward()
        grads = feats.grad[0].float()  # C x h x w
        act = feats.detach()[0].float()
        cam = torch.relu((grads.mean(dim=(1, 2))[:, None, None] * act).sum(0))
        raw = cam.cpu().numpy().astype(np.float32)
        up = torch.nn.functional.interpolate(cam[None, None], size=tuple(pixels.shape[1:]),
                                             mode="bilinear", align_corners=False)[0, 0]
        up = up.cpu().numpy().astype(np.float32)
        up -= up.min()
        heat = up / up.max() if up.max() > 0 else up
        return Explanation(pixels, heat, raw, probs, idx, self.classes[idx], layer, self.classes)

    def _forward_keep_features(self, x):
        """(logits, last conv-stage feature map with its gradient retained, its name)."""
        model = self.model
        if _is_timm(model):  # forward_features ends at the last conv stage, before pooling
            feats = model.forward_features(x)
            feats.retain_grad()
            return model.forward_head(feats), feats, "forward_features"
        if not (hasattr(model, "features") and hasattr(model, "classifier")):
            raise ModelError(f"cannot find the last convolutional stage of "
                             f"{type(model).__name__}", "Grad-CAM needs a CNN")
        children = list(model.features.named_children())
        convs = [i for i, (_, c) in enumerate(children) if _has_conv(c)]
        if not convs:
            raise ModelError("this network has no convolutional layer (a dense net)",
                             "Grad-CAM needs a CNN; try a conv model")
        h, feats, layer = x, None, ""
        for i, (name, child) in enumerate(children):
            h = child(h)
            # the last spatial map at or after the last conv (not global pooling or Flatten)
            if i >= convs[-1] and h.dim() == 4 and h.shape[-1] * h.shape[-2] > 1:
                feats, layer = h, f"features.{name}"
        if feats is None:
            raise ModelError("no spatial feature map after the last conv layer")
        feats.retain_grad()
        return model.classifier(h), feats, layer

    # -- feature maps and filters -----------------------------------------------------------
    def feature_maps(self, source: Any) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
        """The activations (C x h x w) of each conv stage for one image."""
        torch = self.torch
        pixels = self.prepare(source)
        maps: list[tuple[str, np.ndarray]] = []
        hooks = []
        for name, module in conv_stages(self.model):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: maps.append(
                    (name, (o[0] if isinstance(o, tuple | list) else o)[0].detach().float()
                     .cpu().numpy()))))
        try:
            with torch.no_grad():
                self.model(self._tensor(pixels))
        finally:
            for h in hooks:
                h.remove()
        return pixels, [(n, m) for n, m in maps if m.ndim == 3]

    def first_filters(self) -> tuple[str, np.ndarray]:
        """The first Conv2d's weights, out x in x k x k."""
        from torch import nn

        for name, m in self.model.named_modules():
            if isinstance(m, nn.Conv2d):
                return name, m.weight.detach().float().cpu().numpy()
        raise ModelError("this network has no convolutional layer", "--filters needs a CNN")


# -- figures -------------------------------------------------------------------------------
def _plt():
    return pyplot()


def _rgb(pixels: np.ndarray) -> np.ndarray:
    img = pixels.transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (jet colours) blended over the image: uint8 H x W x 3."""
    plt = _plt()
    colours = plt.get_cmap("jet")(heatmap)[..., :3] * 255.0
    return (_rgb(pixels) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def save_overlay_png(exp: Explanation, path: Path) -> Path:
    """A bare overlay image (the report's thumbnails)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(exp.pixels, exp.heatmap)).save(path)
    return path


def plot_gradcam(exp: Explanation, path: Path, title: str = "", top: int = 5) -> Path:
    """Image, heatmap and overlay side by side, titled with the class and probability."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    h, w = exp.heatmap.shape
    panels = [(_rgb(exp.pixels), "model input (after the preprocessing contract)", None),
              (exp.heatmap, f"Grad-CAM heatmap ({exp.layer})", "jet"),
              (overlay(exp.pixels, exp.heatmap), "overlay", None)]
    for ax, (img, name, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"x (pixels, 0..{w - 1})")
        ax.set_ylabel(f"y (pixels, 0..{h - 1})")
        if cmap:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="relevance")
    order = np.argsort(-exp.probs)[:top]
    tops = ", ".join(f"{exp.classes[i].split(',')[0]} {exp.probs[i]:.1%}" for i in order)
    fig.suptitle((title + "\n" if title else "") +
                 f"Grad-CAM for '{exp.class_name}' (p={exp.probs[exp.class_index]:.1%})  "
                 f"top: {tops}", fontsize=10)
    save_figure(fig, path, dpi=100)
    return path


def plot_feature_maps(maps: list[tuple[str, np.ndarray]], pixels: np.ndarray, path: Path,
                      per_stage: int = 8, title: str = "") -> Path:
    """One row per conv stage: the input, then the `per_stage` most active channels."""
    plt = _plt()
    rows = len(maps)
    fig, axes = plt.subplots(rows, per_stage + 1, figsize=(1.7 * (per_stage + 1), 1.9 * rows),
                             squeeze=False)
    for r, (name, m) in enumerate(maps):
        ax = axes[r, 0]
        ax.imshow(_rgb(pixels), cmap="gray")
        ax.set_title("input" if r == 0 else "", fontsize=8)
        ax.set_ylabel(f"{name}\n{m.shape[0]}x{m.shape[1]}x{m.shape[2]}", fontsize=7)
        ax.set_xlabel("x", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        order = np.argsort(-m.reshape(m.shape[0], -1).mean(1))[:per_stage]
        for c in range(per_stage):
            ax = axes[r, c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(order):
                ax.imshow(m[order[c]], cmap="viridis")
                ax.set_title(f"channel {order[c]}", fontsize=7)
                ax.set_xlabel(f"x (0..{m.shape[2] - 1})", fontsize=6)
                ax.set_ylabel(f"y (0..{m.shape[1] - 1})", fontsize=6)
            else:
                ax.axis("off")
    fig.suptitle(title or "Feature maps per convolutional stage (most active channels)",
                 fontsize=11, y=1 - 0.2 / fig.get_figheight())
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.03, top=1 - 0.75 / fig.get_figheight(),
                        wspace=0.45, hspace=0.55)  # tight_layout is slow on large grids
    save_figure(fig, path, dpi=90, tight=False)
    return path


def plot_filters(name: str, weights: np.ndarray, path: Path, title: str = "",
                 limit: int = 64) -> Path:
    """The first layer's kernels: colour when it reads RGB, grey otherwise."""
    plt = _plt()
    n = min(limit, weights.shape[0])
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.axis("off")
            continue
        w = weights[k]
        lo, hi = float(w.min()), float(w.max())
        w = (w - lo) / (hi - lo or 1.0)
        img = w.transpose(1, 2, 0) if w.shape[0] == 3 else w[0]
        ax.imshow(img, cmap=None if w.shape[0] == 3 else "gray", interpolation="nearest")
        ax.set_title(f"filter {k}", fontsize=7)
        ax.set_xlabel("kx", fontsize=6)
        ax.set_ylabel("ky", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    k = weights.shape[-1]
    fig.suptitle(title or f"First-layer kernels ({name}: {weights.shape[0]} filters, "
                          f"{weights.shape[1]} input channel(s), {k}x{k})", fontsize=10)
    save_figure(fig, path, dpi=100)
    return path
