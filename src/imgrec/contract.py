"""The preprocessing contract: how a decoded image becomes the model's input tensor.

Implemented once, here, and used by training-time evaluation, prediction, serving and ONNX
export alike, so a served or exported model sees exactly what it saw in training. Torch-free
(NumPy and Pillow), so the serve path runs without torch; `normalize` also accepts torch
tensors, which is how the training loop normalises whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import BundleError
from .fitting import FITS, WORK_SIDE, fit_image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


#: the largest side a contract may ask for (resize_to of a big pretrained model is ~600)
MAX_SIDE = 4096


@dataclass(frozen=True)
class Preprocess:
    """What a model expects. Stored in the bundle's `imgrec.json` under "preprocess".

    resize: "squash" resizes the whole image to input_size (Keras' flow_from_directory);
    "shorter" resizes the short side to `resize_to` and centre-crops input_size (ImageNet).
    invert: "auto" inverts dark-on-light images for light-on-dark models (MNIST-style photos
    of digits: the workshops' `img = 1 - img`); "yes" always; "no" never.
    fit: how a decoded image (file, upload, URL, canvas drawing) is framed before the model
    sees it (`imgrec.fitting`). "none" resizes it as `resize` says. "digit" is MNIST's own
    normalisation: the paper's uneven background removed, dark ink inverted (per `invert`),
    cropped to the ink, fitted into 20 x 20 keeping the aspect ratio and centred by its
    centre of mass in 28 x 28 (sizes scale with frame_size), then centre-cropped like the
    training images (MNIST's recipe: 24 of 28). "object" is Fashion-MNIST's:
    inverted when on a light background, cropped to the object, its longest edge fitted to
    the frame, centred. In-memory arrays of the training set (`fit_arrays`) are already
    framed and never go through it. Bundles written before the field existed load as "none".
    """

    input_size: int
    channels: int = 3
    resize: Literal["squash", "shorter"] = "squash"
    resize_to: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    invert: Literal["auto", "yes", "no"] = "no"
    #: test-time augmentation: ("flip",) averages the logits of the image and its mirror
    #: (airbench's flip TTA); applied by Predictor and training-time validation alike.
    tta: tuple[str, ...] = ()
    fit: Literal["none", "digit", "object"] = "none"

    def __post_init__(self) -> None:
        """Every value checked where a bundle is read: a hand-edited or damaged imgrec.json
        fails when the model loads, in one line, not in every request after (input_size 0
        divided by zero, std 0 gave null probabilities, a huge resize_to ran out of memory)."""
        if self.channels not in (1, 3):
            raise BundleError(f"preprocess.channels must be 1 or 3, not {self.channels}")
        for name in ("input_size", "resize_to"):
            side = getattr(self, name)
            if side is None and name == "resize_to":
                continue
            if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE:
                raise BundleError(f"preprocess.{name} must be a whole number of pixels from 1 "
                                  f"to {MAX_SIDE}, not {side!r}")
        if self.resize not in ("squash", "shorter"):
            raise BundleError(f"preprocess.resize must be squash or shorter, not {self.resize!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise BundleError("preprocess mean/std must have one value per channel")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in self.mean) or \
                not all(isinstance(v, int | float) and math.isfinite(v) and v > 0
                        for v in self.std):
            raise BundleError("preprocess mean must be finite numbers and std positive ones, "
                              f"not {list(self.mean)} / {list(self.std)}")
        if self.invert not in ("auto", "yes", "no"):
            raise BundleError(f"preprocess.invert must be auto, yes or no, not {self.invert!r}")
        if self.interpolation not in _RESAMPLE:
            raise BundleError(f"unknown interpolation {self.interpolation!r}")
        if set(self.tta) - {"flip"}:
            raise BundleError(f"unknown test-time augmentation {self.tta!r} (known: flip)")
        if self.fit not in FITS:
            raise BundleError(f"unknown preprocess.fit {self.fit!r} (known: {', '.join(FITS)})")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["tta"] = list(self.mean), list(self.std), list(self.tta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["mean"] = tuple(known.get("mean", (0.5,) * known.get("channels", 3)))
        known["std"] = tuple(known.get("std", (0.5,) * known.get("channels", 3)))
        known["tta"] = tuple(known.get("tta") or ())
        return cls(**known)

    def replace(self, **changes: Any) -> Preprocess:
        return Preprocess.from_dict({**self.to_dict(), **changes})

    # -- the pipeline --------------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        """The side images are framed at before the centre crop: resize_to when the contract
        crops ("shorter"), else input_size."""
        return max(self.input_size, self.resize_to or 0) if self.resize == "shorter" \
            else self.input_size

    def centre_crop(self, pixels: np.ndarray) -> np.ndarray:
        """The centre input_size x input_size of an array (... x H x W) framed at frame_size:
        MNIST's recipe drops the 2-pixel border its digits never reach."""
        h, w = pixels.shape[-2:]
        size = self.input_size
        if (h, w) == (size, size):
            return pixels
        top, left = (h - size) // 2, (w - size) // 2
        return pixels[..., top : top + size, left : left + size]

    @property
    def draft_size(self) -> tuple[int, int]:
        """The smallest decode size that keeps full quality for this contract (JPEG draft)."""
        side = self.resize_to or self.input_size
        if self.fit != "none":  # the digit or object may be a small part of the photo
            side = max(side, WORK_SIDE)
        return (side, side)

    def resize_image(self, img: Image.Image) -> Image.Image:
        """Resize (and crop) a decoded image to input_size x input_size."""
        resample = _RESAMPLE[self.interpolation]
        size = self.input_size
        if self.resize == "squash":
            if img.size != (size, size):
                img = img.resize((size, size), resample, reducing_gap=3.0)
            return img
        short = self.resize_to or size
        w, h = img.size
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if max(nw, nh) > 4 * short:
            # An extreme aspect ratio (a 200000 x 1 PNG is a few hundred bytes) would be resized to
            # gigapixels: first cut the long side down to what the centre crop keeps.
            img = self._trim_long_side(img, scale, size)
            w, h = img.size
            scale = short / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if (nw, nh) == (w, h):
            return img.crop((left, top, left + size, top + size))
        # Resample only the centre crop's pixels (the `box` in source coordinates), not the
        # whole resized image: the same pixels to within rounding, a third less decode time.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box, reducing_gap=3.0)

    @staticmethod
    def _trim_long_side(img: Image.Image, scale: float, size: int) -> Image.Image:
        """The centre of the long side, as many source pixels as the crop needs plus a margin
        for the resampling filter."""
        w, h = img.size
        keep = min(max(w, h), int(np.ceil(size / scale)) + 8)
        if w >= h:
            left = (w - keep) // 2
            return img.crop((left, 0, left + keep, h))
        top = (h - keep) // 2
        return img.crop((0, top, w, top + keep))

    def should_invert(self, pixels: np.ndarray, invert: str | None = None) -> bool:
        """Whether to invert this uint8 HxWxC image: 'auto' looks at the border, which is
        background in a photo of a digit; a light border means dark-on-light."""
        mode = invert or self.invert
        if mode == "yes":
            return True
        if mode == "no":
            return False
        border = np.concatenate(
            [pixels[0].ravel(), pixels[-1].ravel(), pixels[:, 0].ravel(), pixels[:, -1].ravel()]
        )
        return float(border.mean()) > 127.0

    def to_uint8(self, img: Image.Image, invert: str | None = None,
                 fit: str | None = None) -> np.ndarray:
        """A decoded image -> uint8 array C x H x W, resized and (if needed) inverted, or
        framed as `fit` (default: the contract's) says."""
        fit = fit or self.fit
        # an image already at the frame size (28 x 28 for MNIST) is a dataset image, framed
        # already: framing it again moved its pixels (MNIST's test digits saved as PNG scored
        # 0.9944 where evaluate on the arrays, which are never fitted, said 0.9949)
        if fit != "none" and img.size != (self.frame_size, self.frame_size):
            framed = self.centre_crop(fit_image(img, fit, self.frame_size, invert or self.invert))
            return np.ascontiguousarray(np.repeat(framed[None], self.channels, axis=0))
        img = self.resize_image(img)
        pixels = np.asarray(img, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.should_invert(pixels, invert):
            pixels = 255 - pixels
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def normalize(self, batch: Any) -> Any:
        """uint8 batch N x C x H x W (NumPy array or torch tensor) -> float32, scaled and
        standardised. The single place mean/std are applied. Torch tensors are handled by
        their own methods, so this module never imports torch (the serve path is torch-free)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1) * 255.0
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1) * 255.0
        if isinstance(batch, np.ndarray):  # in place, one float32 array: 4x faster, same bits
            out = np.subtract(batch, mean, dtype=np.float32)
            return np.divide(out, std, out=out)
        batch = batch.float()
        return (batch - batch.new_tensor(mean)) / batch.new_tensor(std)

    def tta_logits(self, run: Callable[[Any], Any], x: Any) -> Any:
        """The model's logits for a normalised batch with this contract's test-time
        augmentation: with "flip", the mean of the logits of the images and their mirrors.
        The one TTA used by predict, training-time validation, evaluation and explain, so
        they all score an image alike. `run` maps a batch to logits; NumPy arrays and torch
        tensors (differentiable: Grad-CAM goes through it) both work."""
        out = run(x)
        if "flip" in self.tta:
            mirrored = x.flip(-1) if hasattr(x, "flip") else np.ascontiguousarray(x[..., ::-1])
            out = (out + run(mirrored)) / 2
        return out

    def __call__(self, img: Image.Image, invert: str | None = None) -> np.ndarray:
        """One decoded image -> float32 C x H x W model input."""
        return self.normalize(self.to_uint8(img, invert)[None])[0]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- the contracts a new model is given (recorded in its bundle) ----------------------------
def scratch_contract(channels: int, image_size: int, invert: str | None = None,
                     in_memory: bool = False) -> Preprocess:
    """A network trained from scratch: the whole image squashed to image_size; greyscale
    scaled to [-1, 1], colour standardised with ImageNet's statistics. MNIST-style arrays
    (greyscale, in memory: light ink on dark) invert dark-on-light photos by default."""
    grey = channels == 1
    default_invert = "auto" if grey and in_memory else "no"
    return Preprocess(input_size=image_size, channels=channels, resize="squash",
                      interpolation="bilinear", mean=(0.5,) if grey else IMAGENET_MEAN,
                      std=(0.5,) if grey else IMAGENET_STD, invert=invert or default_invert)


def lite_contract(native_size: int, resize_to: int, image_size: int | None = None) -> Preprocess:
    """The offline EfficientNet-Lite weights' contract: inputs in [-1, 1] (with ImageNet
    mean/std top-1 drops by ~10 points), short side resized bicubic, centre crop. Another
    image_size scales the resize with it."""
    size = native_size
    if image_size and image_size != native_size:
        resize_to, size = round(image_size * resize_to / native_size), image_size
    return Preprocess(input_size=size, channels=3, resize="shorter", resize_to=resize_to,
                      interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def timm_contract(data_config: dict[str, Any], image_size: int | None = None) -> Preprocess:
    """The contract from a timm pretrained data config (`timm.data.resolve_data_config`:
    input_size, crop_pct, crop_mode, interpolation, mean, std): callers never hard-code them."""
    size = image_size or int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    squash = data_config.get("crop_mode") == "squash"
    interp = data_config.get("interpolation", "bilinear")
    return Preprocess(
        input_size=size, channels=3, resize="squash" if squash else "shorter",
        resize_to=None if squash else max(size, math.floor(size / crop_pct)),
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        mean=tuple(float(m) for m in data_config["mean"]),
        std=tuple(float(s) for s in data_config["std"]),
    )


def load_input(
    source, contract: Preprocess, invert: str | None = None, max_pixels: int | None = None,
    name: str | None = None,
):
    """Decode a file or bytes (called `name` in messages) and apply the contract: uint8
    C x H x W. The one path from an image on disk or on the wire to model pixels (train,
    evaluate, predict, serve)."""
    from .images import MAX_PIXELS, decode_image

    img = decode_image(source, contract.channels, max_pixels or MAX_PIXELS, contract.draft_size,
                       name)
    return contract.to_uint8(img, invert)


def fit_arrays(images: np.ndarray, contract: Preprocess) -> np.ndarray:
    """In-memory uint8 N x C x H x W images at another size or channel count than the
    contract's go through the contract once, image by image (same code as files). They are a
    built-in dataset's, already framed: `fit` never applies to them."""
    if images.shape[-1] == contract.input_size and images.shape[1] == contract.channels:
        return images
    if (images.shape[-2:] == (contract.frame_size,) * 2 and images.shape[1] == contract.channels
            and contract.frame_size > contract.input_size):  # a cropping recipe (MNIST's)
        return np.ascontiguousarray(contract.centre_crop(images))
    out = np.empty((len(images), contract.channels, contract.input_size, contract.input_size),
                   np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        pil = pil.convert("L" if contract.channels == 1 else "RGB")
        out[i] = contract.to_uint8(pil, invert="no", fit="none")
    return out
