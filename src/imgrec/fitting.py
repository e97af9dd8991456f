"""How a custom image (a canvas drawing, a photo of a digit on paper, a product photo) is framed
the way MNIST or Fashion-MNIST framed their images, before a model trained on them sees it.

Called by the preprocessing contract (`Preprocess.fit`), never directly by a command, so
predict, evaluate, serve and export share it. Torch-free and SciPy-free: NumPy and Pillow.

    digit   MNIST's own normalisation (LeCun et al.): the paper's uneven background is removed
            (a robust low-order surface fitted to the background, so a lighting gradient goes),
            dark-on-light ink is inverted, the grey levels of the ink are stretched over
            0..255, specks are dropped, the ink's bounding box is scaled to fit 20 x 20
            (for a 28-pixel input) keeping its aspect ratio with area anti-aliasing, and
            pasted in the 28 x 28 frame with its centre of mass at the centre.
    object  Fashion-MNIST's conversion: the background colour (the border's) is trimmed away,
            the object inverted when it stands on a light background, scaled so its longest
            edge fills the frame, and centred by its bounding box.

Both scale with the contract's input size (the digit box is 20/28 of it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FITS = ("none", "digit", "object")

#: working resolution: the longest side an image is reduced to before it is analysed
WORK_SIDE = 512
#: the coarse grid the background surface is fitted on, and the one components are found on
SURFACE_SIDE = 64
COMPONENT_SIDE = 100
#: MNIST: the digit's box is 20 of the 28 pixels; Fashion-MNIST: the object fills the frame
DIGIT_BOX = 20 / 28


def fit_image(img: Image.Image, fit: str, size: int, invert: str = "auto") -> np.ndarray:
    """A decoded image -> uint8 size x size greyscale array framed as `fit` says.

    `invert` is the contract's: "yes" (the input is dark-on-light: invert it), "no" (it is
    already light-on-dark) or "auto" (decide from the image)."""
    grey = _working_grey(img)
    if fit == "digit":
        return fit_digit(grey, size, invert)
    if fit == "object":
        return fit_object(grey, size, invert)
    raise ValueError(f"unknown fit {fit!r} (known: {', '.join(FITS)})")


def _working_grey(img: Image.Image) -> np.ndarray:
    """Greyscale float32, the longest side reduced to at most WORK_SIDE (area averaging)."""
    if img.mode != "L":
        img = img.convert("L")
    w, h = img.size
    scale = WORK_SIDE / max(w, h)
    if scale < 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


# -- digits ---------------------------------------------------------------------------------
def fit_digit(grey: np.ndarray, size: int = 28, invert: str = "auto") -> np.ndarray:
    """MNIST's normalisation of a greyscale float image (see the module's docstring)."""
    ink = ink_map(grey, invert)
    box = max(1, round(size * DIGIT_BOX))
    keep = _main_ink(ink)
    if keep is None:  # a blank page: nothing to frame
        return np.zeros((size, size), np.uint8)
    top, bottom, left, right = keep
    crop = ink[top:bottom, left:right]
    digit = _scale_into(crop, box)
    peak = float(digit.max())
    if peak <= 0:
        return np.zeros((size, size), np.uint8)
    digit *= 255.0 / peak
    return _paste_by_mass(digit, size)


def ink_map(grey: np.ndarray, invert: str = "auto") -> np.ndarray:
    """Float image of the ink alone: the background surface subtracted, ink made light, its
    grey levels stretched so that solid ink is ~255 and the paper (and its noise) 0."""
    background = _background_surface(grey)
    residual = grey - background
    sigma = _noise_sigma(residual)
    if invert == "yes":
        dark_ink = True
    elif invert == "no":
        dark_ink = False
    else:
        dark_ink = _ink_is_dark(residual, sigma)
    r = -residual if dark_ink else residual
    smooth = _box_blur(r, 1)
    # the noise left after the 3x3 average is a third of the pixels'; Otsu on what is above it
    threshold = max(_otsu(smooth[smooth > sigma]), 4.0 * sigma / 3.0 + 2.0)
    solid = smooth > threshold
    if not solid.any():
        return np.zeros_like(grey)
    level = float(np.percentile(r[solid], 90))
    low = min(3.0 * sigma, 0.5 * threshold)
    if level <= low:
        return np.zeros_like(grey)
    ink = np.clip((r - low) / (level - low), 0.0, 1.0) * 255.0
    # pixels far from any solid ink are noise or paper texture: zero them
    near = _dilate(solid, 2)
    ink[~near] = 0.0
    return ink.astype(np.float32)


def _background_surface(grey: np.ndarray) -> np.ndarray:
    """A robust quadratic surface through the background (paper) pixels: fitted on a coarse
    grid, rejecting the ink (whichever its polarity) as outliers, evaluated at full size."""
    h, w = grey.shape
    scale = SURFACE_SIDE / max(h, w)
    if scale < 1:
        small = np.asarray(Image.fromarray(grey, "F").resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX))
    else:
        small = grey
    sh, sw = small.shape
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float64)
    # coordinates in [-1, 1] over the image, the same at both resolutions
    yy = (yy + 0.5) / sh * 2 - 1
    xx = (xx + 0.5) / sw * 2 - 1
    values = small.astype(np.float64).ravel()
    terms = _surface_terms(yy.ravel(), xx.ravel())
    coefs = np.zeros(6)
    coefs[0] = np.median(values)
    keep = np.ones(values.shape, bool)
    for n_terms in (1, 3, 6, 6, 6):  # constant, plane, quadratic, then refined
        resid = values - terms @ coefs
        spread = np.abs(resid[keep] - np.median(resid[keep]))
        sigma = 1.4826 * float(np.median(spread)) + 1.0
        keep = np.abs(resid) < 3.0 * sigma  # the ink, light or dark, is left out
        if keep.sum() < 4 * n_terms:
            break
        coefs = np.zeros(6)
        a = terms[keep, :n_terms]
        # normal equations: a 6 x 6 solve (lstsq's SVD is slow for no gain here)
        gram = a.T @ a + 1e-6 * np.eye(n_terms)
        coefs[:n_terms] = np.linalg.solve(gram, a.T @ values[keep])
    fy = (np.arange(h, dtype=np.float64) + 0.5) / h * 2 - 1
    fx = (np.arange(w, dtype=np.float64) + 0.5) / w * 2 - 1
    c = coefs
    surface = (c[0] + c[1] * fy[:, None] + c[2] * fx[None, :] + c[3] * (fy * fy)[:, None]
               + c[4] * fy[:, None] * fx[None, :] + c[5] * (fx * fx)[None, :])
    return surface.astype(np.float32)


def _surface_terms(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(y), y, x, y * y, y * x, x * x], axis=1)


def _noise_sigma(residual: np.ndarray) -> float:
    """Pixel noise from the differences of neighbours (robust to the ink and the surface)."""
    d = residual[:, 1:] - residual[:, :-1]
    if d.size == 0:
        return 0.0
    d = d[::2, ::2] if d.size > 200_000 else d
    return float(1.4826 * np.median(np.abs(d)) / np.sqrt(2.0))


def _ink_is_dark(residual: np.ndarray, sigma: float) -> bool:
    """Which tail of the residual is the ink: the one holding more mass beyond the noise."""
    margin = 4.0 * sigma + 8.0
    dark = np.clip(-residual - margin, 0, None).sum()
    light = np.clip(residual - margin, 0, None).sum()
    return bool(dark > light)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a set of values (0 when there are too few)."""
    if values.size < 2:
        return 0.0
    hi = float(values.max())
    if hi <= 0:
        return 0.0
    hist, edges = np.histogram(values, bins=256, range=(0.0, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edges replicated (separable sums of shifted views)."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    p = np.pad(a.astype(np.float32, copy=False), radius, mode="edge")
    h, w = a.shape
    rows = sum(p[i : i + h] for i in range(k))
    return sum(rows[:, j : j + w] for j in range(k)) / float(k * k)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _box_blur(mask.astype(np.float32), radius) > 0


def _main_ink(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right) of the ink, leaving out specks: components
    (8-connected, on a coarse grid) with under 5% of the largest one's ink."""
    solid = ink > 64
    if not solid.any():
        return None
    h, w = solid.shape
    f = max(1, int(np.ceil(max(h, w) / COMPONENT_SIDE)))
    ph, pw = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((ph, pw), np.float32)
    padded[:h, :w] = ink
    cells = padded.reshape(ph // f, f, pw // f, f).sum(axis=(1, 3))
    labels = _components(cells > 64)
    mass = np.bincount(labels.ravel(), weights=cells.ravel())
    mass[0] = 0
    kept = mass >= 0.05 * mass.max()
    keep_cells = kept[labels]
    keep = np.repeat(np.repeat(keep_cells, f, axis=0), f, axis=1)[:h, :w] & solid
    if not keep.any():
        return None
    # the box of the kept ink, widened to its faint edges (anti-aliasing, blur)
    lit = _dilate(keep, 1) & (ink > 0)
    rows, cols = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = background, others arbitrary positive ints):
    min-label propagation with pointer jumping, in NumPy."""
    h, w = mask.shape
    big = h * w + 1
    idx = np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w)
    labels = np.where(mask, idx, big)
    flat_mask = mask.ravel()
    for _ in range(h * w):
        p = np.pad(labels, 1, constant_values=big)
        nb = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nb = np.minimum(nb, p[dy : dy + h, dx : dx + w])
        nb = np.where(mask, nb, big)
        # pointer jumping: a label is a pixel index; take that pixel's label
        flat = nb.ravel()
        jumped = flat.copy()
        sel = flat_mask & (flat < big)
        jumped[sel] = flat[flat[sel] - 1]
        jumped = np.minimum(jumped, flat).reshape(h, w)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    return np.where(mask, labels, 0)


def _scale_into(crop: np.ndarray, box: int) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio; area averaging
    when shrinking (MNIST's anti-aliasing)."""
    h, w = crop.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32), "F").resize(
        (nw, nh), method)
    return np.asarray(out, dtype=np.float32).copy()


def _paste_by_mass(digit: np.ndarray, size: int) -> np.ndarray:
    """Paste into size x size so that the centre of mass lands on the frame's centre (as
    MNIST: pixel centre size/2 in index coordinates), whole-pixel shift."""
    h, w = digit.shape
    total = float(digit.sum())
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    cy = float((digit.sum(1) * ys).sum() / total)
    cx = float((digit.sum(0) * xs).sum() / total)
    top, left = int(round(size / 2 - cy)), int(round(size / 2 - cx))
    frame = np.zeros((size, size), np.float32)
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(size, top + h), min(size, left + w)
    if y1 > y0 and x1 > x0:
        frame[y0:y1, x0:x1] = digit[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


# -- objects (Fashion-MNIST) --------------------------------------------------------------------
def fit_object(grey: np.ndarray, size: int = 28, invert: str = "auto") -> np.ndarray:
    """Fashion-MNIST's framing of a greyscale float image (see the module's docstring)."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if invert == "yes":
        light_background = True
    elif invert == "no":
        light_background = False
    else:
        light_background = float(border.mean()) > 127.0
    x = 255.0 - grey if light_background else grey
    b = float(np.median(255.0 - border if light_background else border))
    # the background colour becomes 0; the object keeps its grey levels
    x = np.clip((x - b) * (255.0 / max(1.0, 255.0 - b)), 0.0, 255.0)
    # trim what is within 5% of the background colour (Fashion-MNIST's rule), minus specks
    keep = _main_ink(np.where(x > 0.05 * 255.0, 255.0, 0.0).astype(np.float32))
    if keep is None:
        return np.zeros((size, size), np.uint8)
    top, bottom, left, right = keep
    obj = _scale_into(x[top:bottom, left:right], size)
    h, w = obj.shape
    frame = np.zeros((size, size), np.float32)
    y0, x0 = (size - h) // 2, (size - w) // 2
    frame[y0 : y0 + h, x0 : x0 + w] = obj
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)
