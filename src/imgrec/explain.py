"""See what a network looks at: Grad-CAM heatmaps, feature maps of each convolutional stage,
and the first layer's learned kernels.

Reads only the bundle (zoo.open_bundle + network.load_model), turns an image into model input
only through the preprocessing contract (contract.load_input, with predict's invert), and
scores it with the contract's test-time augmentation (Preprocess.tta_logits), so the heatmap
is drawn over exactly the pixels the model saw and the probabilities are predict's. Every
network, timm's or imgrec's, exposes timm's interface: Grad-CAM hooks nothing, it takes the
output of `forward_features` (the last feature map before pooling) and runs `forward_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .contract import load_input
from .errors import InputError, ModelError
from .figures import drawing, save_figure
from .network import load_model
from .zoo import open_bundle

#: containers whose children are a network's stages (imgrec's `features`, timm's `blocks`,
#: `stages`, `layers`); a nested backbone (anything with forward_features) is walked too
STAGE_CONTAINERS = ("features", "blocks", "stages", "layers")


# -- finding the layers ----------------------------------------------------------------------
def _is_act(m: Any) -> bool:
    from torch import nn

    acts = nn.ReLU | nn.ReLU6 | nn.GELU | nn.SiLU | nn.LeakyReLU | nn.ELU | nn.Hardswish
    return isinstance(m, acts)


def _has_conv(m: Any) -> bool:
    from torch import nn

    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _stage_candidates(module: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The network's top-level modules in order, with stage containers and nested backbones
    opened one level, so each entry is a stem, a stage, a head or a single layer."""
    from torch import nn

    out = []
    for name, child in module.named_children():
        container = isinstance(child, nn.Sequential | nn.ModuleList) and name in STAGE_CONTAINERS
        if container or hasattr(child, "forward_features"):
            out += _stage_candidates(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def conv_stages(model: Any) -> list[tuple[str, Any]]:
    """The modules whose outputs are the per-stage activation maps (the workshop figure): each
    entry holding a convolution, or the activation right after a bare Conv2d."""
    from torch import nn

    entries = _stage_candidates(model)
    stages = []
    for i, (name, module) in enumerate(entries):
        if not _has_conv(module):
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        bare = isinstance(module, nn.Conv2d) and nxt is not None and _is_act(nxt[1])
        stages.append(nxt if bare else (name, module))
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
        self._centres: dict[tuple, tuple] = {}  # cell_centres, per input and grid size

    # -- inputs ----------------------------------------------------------------------------
    def prepare(self, source: Any, invert: str | None = None) -> np.ndarray:
        """File path, bytes or a uint8 C x H x W array -> uint8 C x H x W through the contract
        (decoded and inverted exactly as predict does: same function, same `invert`)."""
        if isinstance(source, np.ndarray):
            return source
        return load_input(source, self.bundle.preprocess, invert)

    def _tensor(self, pixels: np.ndarray):
        x = self.bundle.preprocess.normalize(pixels[None].astype(np.uint8))
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def probabilities(self, source: Any, invert: str | None = None) -> np.ndarray:
        """Class probabilities as predict computes them (contract, TTA, temperature)."""
        from .predict import softmax

        x = self._tensor(self.prepare(source, invert))
        with self.torch.no_grad():
            logits = self.bundle.preprocess.tta_logits(self.model, x)
        return softmax(logits.float().cpu().numpy(), self.bundle.temperature)[0]

    def class_index(self, name: str | int | None, probs: np.ndarray) -> int:
        """A class by exact name, index, synonym (ImageNet names list several), or unique
        substring; None is the top class. An exact name wins over an index: classes named
        by digits (folders 1/ and 2/) are common."""
        if name is None:
            return int(probs.argmax())
        if isinstance(name, str) and name in self.classes:
            return self.classes.index(name)
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
    def gradcam(self, source: Any, target: str | int | None = None,
                invert: str | None = None) -> Explanation:
        """Grad-CAM (Selvaraju et al. 2017) for `target` (default: the top class): the last
        conv stage's channels weighted by the mean gradient of the class score, ReLU. The
        score is the contract's TTA'd logit (predict's); with flip TTA the mirror's CAM is
        mirrored back and the two are averaged."""
        from .predict import softmax

        torch = self.torch
        pixels = self.prepare(source, invert)
        self._check_conv()
        kept: list[Any] = []
        with torch.enable_grad():
            logits = self.bundle.preprocess.tta_logits(lambda t: self._head(t, kept),
                                                       self._tensor(pixels))
            probs = softmax(logits.detach().float().cpu().numpy(), self.bundle.temperature)[0]
            idx = self.class_index(target, probs)
            self.model.zero_grad(set_to_none=True)
            logits[0, idx].backward()
        cams = [_cam(feats).cpu().numpy().astype(np.float32) for feats in kept]
        raw = cams[0] if len(cams) == 1 else (cams[0] + cams[1][:, ::-1]) / 2
        centres = self.cell_centres(pixels.shape, cams[0].shape)
        # each cell drawn where its receptive field is centred, the mirror's mirrored back
        # in pixels (a grid flip is no pixel mirror when the cells are not centred on it)
        ups = [upsample(cam, pixels.shape[1:], centres) for cam in cams]
        up = ups[0] if len(ups) == 1 else (ups[0] + ups[1][:, ::-1]) / 2
        up -= up.min()
        heat = up / up.max() if up.max() > 0 else up
        return Explanation(pixels, heat, raw, probs, idx, self.classes[idx], "forward_features",
                           self.classes)

    def cell_centres(self, shape: tuple[int, ...], grid: tuple[int, int]
                     ) -> tuple[tuple[float, float], tuple[float, float]]:
        """Where the feature map's cells sit in the input, ((stride, offset) down, across):
        cell k is centred on pixel stride * k + offset. Measured once per input size as the
        centroid of the centre cell's receptive field (input gradients over noise images):
        timm's stride-2 convolutions centre cell k on pixel 32k, where the usual upsampling
        puts it at 32k + 15.5, a heat map 16-25 px down and right of the object."""
        key = (tuple(shape), tuple(grid))
        if key not in self._centres:
            torch = self.torch
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(4, *shape, generator=gen).to(self.device).requires_grad_(True)
            with torch.enable_grad():
                feats = self.model.forward_features(x)
                i, j = grid[0] // 2, grid[1] // 2
                (grad,) = torch.autograd.grad(feats[:, :, i, j].sum(), x)
            field = grad.abs().sum((0, 1)).float().cpu().numpy().astype(np.float64)
            self._centres[key] = tuple(
                _stride_offset(field.sum(axis), n, cells, k)
                for axis, n, cells, k in ((1, shape[1], grid[0], i), (0, shape[2], grid[1], j)))
        return self._centres[key]

    def _check_conv(self) -> None:
        if not _has_conv(self.model):
            raise ModelError("this network has no convolutional layer (a dense net)",
                             "Grad-CAM needs a CNN; try a conv model")

    def _head(self, x, kept: list):
        """forward_head(forward_features(x)), keeping the feature map and its gradient."""
        feats = self.model.forward_features(x)
        if feats.dim() != 4 or feats.shape[-1] * feats.shape[-2] <= 1:
            raise ModelError(f"{type(self.model).__name__}.forward_features gives no spatial "
                             f"feature map (shape {tuple(feats.shape)})", "Grad-CAM needs a CNN")
        feats.retain_grad()
        kept.append(feats)
        return self.model.forward_head(feats)

    # -- feature maps and filters -----------------------------------------------------------
    def feature_maps(self, source: Any, invert: str | None = None
                     ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
        """The activations (C x h x w) of each conv stage for one image."""
        torch = self.torch
        pixels = self.prepare(source, invert)
        maps: list[tuple[str, np.ndarray]] = []
        hooks = []
        for name, module in conv_stages(self.model):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: maps.append(
                    (name, (o[0] if isinstance(o, tuple | list) else o)[0].detach().float()
                     .cpu().numpy()))))
        try:
            with torch.no_grad():  # every conv stage lies on the forward_features path
                self.model.forward_features(self._tensor(pixels))
        finally:
            for h in hooks:
                h.remove()
        return pixels, [(n, m) for n, m in maps if m.ndim == 3]

    def first_filters(self) -> tuple[str, np.ndarray]:
        """The first Conv2d's weights, out x in x k x k, as kernels over the image's pixels:
        after a space-to-depth stem (PixelUnshuffle by r, fast-cnn's MNIST stem) its
        k x k kernel over r x r-folded pixels is the (k*r) x (k*r) kernel it is on the
        image, and the input channels are the image's again."""
        from torch import nn

        fold = 1
        for name, m in self.model.named_modules():
            if isinstance(m, nn.PixelUnshuffle):
                fold = m.downscale_factor
            if isinstance(m, nn.Conv2d):
                w = m.weight.detach().float().cpu().numpy()
                if fold > 1 and w.shape[1] % (fold * fold) == 0:
                    return f"{name}, {w.shape[-1]}x{w.shape[-1]} on {fold}x{fold}-folded " \
                           "pixels", unfold_kernels(w, fold)
                return name, w
        raise ModelError("this network has no convolutional layer", "--filters needs a CNN")


def unfold_kernels(weights: np.ndarray, fold: int) -> np.ndarray:
    """Kernels of a convolution that follows PixelUnshuffle(fold), out x C*fold^2 x k x k,
    as the out x C x (k*fold) x (k*fold) kernels they apply to the unfolded image (channel
    c*fold^2 + i*fold + j of the folded input holds pixel (i, j) of each fold x fold block)."""
    out, folded, k, _ = weights.shape
    c = folded // (fold * fold)
    w = weights.reshape(out, c, fold, fold, k, k).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(w.reshape(out, c, k * fold, k * fold))


def _stride_offset(profile: np.ndarray, size: int, cells: int, k: int) -> tuple[float, float]:
    """(stride, offset) of a feature-map axis from its centre cell k's receptive-field
    profile along that axis (the field's centroid is cell k's pixel)."""
    stride = size / cells
    total = profile.sum()
    centre = float((profile * np.arange(size)).sum() / total) if total > 0 else \
        stride * k + (stride - 1) / 2
    return stride, centre - stride * k


def upsample(cam: np.ndarray, size: tuple[int, int],
             centres: tuple[tuple[float, float], tuple[float, float]]) -> np.ndarray:
    """A h x w map drawn at `size` pixels, bilinear between the cells' centres (held flat past
    the outer ones): (stride, offset) per axis puts cell k on pixel stride * k + offset."""
    out = cam.astype(np.float32)
    for axis, (n, (stride, offset)) in enumerate(zip(size, centres, strict=True)):
        cells = out.shape[axis]
        at = np.clip((np.arange(n) - offset) / stride, 0, cells - 1)
        lo = np.floor(at).astype(int)
        hi = np.minimum(lo + 1, cells - 1)
        frac = (at - lo).astype(np.float32)
        if axis == 0:
            out = out[lo] * (1 - frac)[:, None] + out[hi] * frac[:, None]
        else:
            out = out[:, lo] * (1 - frac) + out[:, hi] * frac
    return out


def _cam(feats) -> Any:
    """ReLU(sum over channels of activation x mean gradient): h x w."""
    grads = feats.grad[0].float()  # C x h x w
    act = feats.detach()[0].float()
    return (grads.mean(dim=(1, 2))[:, None, None] * act).sum(0).relu()


# -- figures -------------------------------------------------------------------------------
def _plt():
    return drawing()


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
