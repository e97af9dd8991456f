"""Hand-drawn and photographed digits against the served default MNIST bundle (issue 9).

500 drawings on 280 x 280 canvases (balanced over 0-9, seeded): half rendered from the DejaVu
and Liberation fonts (regular, bold, oblique, condensed, serif, mono...), half drawn along
stroke paths generated per digit (spline templates with jitter, slant and aspect), strokes
4-30 px wide, the digit 40-90% of the canvas high and anywhere in it; three in four are dark
on white like the web page's canvas, the rest light on black. The same 500 'photographed':
dark ink on grey paper, a lighting gradient, rotated up to 10 degrees, blurred, noisy, JPEG.

The bundle is `imgrec train mnist` (the default recipe, MNIST alone, nothing like these
images), served by a real `imgrec serve` on a loopback port; each image is POSTed to
/v1/predict. "before" serves a copy of the same bundle whose contract has fit "none" (what
every bundle did before issue 9). Also measured: the 10,000 MNIST test digits sent as PNG files
through the contract with and without the digit fit (the fit must not hurt real MNIST).

    .venv/bin/python benchmarks/digit_drawings.py [--bundle DIR] [--save-images DIR]

Targets: >= 95% top-1 on the drawings, >= 90% on the photographs.
Results: benchmarks/results/digit_drawings.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import IMGREC, ROOT, WORK, mnist_dir, timed, write_result
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 280
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))


# -- stroke templates --------------------------------------------------------------------------
# Each digit has variants; a variant is a list of strokes; a stroke is ("s", points) for a
# smooth spline through the points or ("l", points) for straight segments. Unit box: x 0..1
# (later scaled to the digit's width), y 0..1 from top to bottom.
def _ellipse(n: int = 14, start: float = -0.25, overlap: float = 0.08) -> list:
    t = np.linspace(start, start + 1 + overlap, n) * 2 * np.pi
    return [(0.5 + 0.5 * np.cos(a), 0.5 + 0.5 * np.sin(a)) for a in t]


TEMPLATES: dict[int, list[list[tuple[str, list]]]] = {
    0: [[("s", _ellipse())], [("s", _ellipse(start=0.2, overlap=0.02))]],
    1: [[("l", [(0.5, 0.0), (0.5, 1.0)])],
        [("l", [(0.15, 0.25), (0.6, 0.0), (0.6, 1.0)])],
        [("l", [(0.15, 0.22), (0.55, 0.0), (0.55, 1.0)]), ("l", [(0.2, 1.0), (0.9, 1.0)])]],
    2: [[("s", [(0.05, 0.25), (0.3, 0.02), (0.7, 0.02), (0.93, 0.25), (0.85, 0.5),
                (0.5, 0.75), (0.05, 1.0)]), ("l", [(0.05, 1.0), (1.0, 1.0)])],
        [("s", [(0.08, 0.2), (0.45, 0.0), (0.85, 0.12), (0.85, 0.42), (0.4, 0.78),
                (0.05, 1.0), (0.25, 0.93), (0.6, 0.97), (1.0, 1.0)])]],
    3: [[("s", [(0.08, 0.15), (0.4, 0.0), (0.8, 0.05), (0.88, 0.25), (0.7, 0.42), (0.4, 0.48)]),
         ("s", [(0.4, 0.48), (0.8, 0.55), (0.95, 0.75), (0.75, 0.97), (0.35, 1.0),
                (0.05, 0.85)])],
        [("l", [(0.05, 0.0), (0.9, 0.0), (0.45, 0.4)]),
         ("s", [(0.45, 0.4), (0.85, 0.52), (0.95, 0.75), (0.75, 0.97), (0.35, 1.0),
                (0.05, 0.85)])]],
    4: [[("l", [(0.7, 1.0), (0.7, 0.0), (0.0, 0.68), (1.0, 0.68)])],
        [("l", [(0.15, 0.0), (0.08, 0.58), (1.0, 0.58)]), ("l", [(0.75, 0.15), (0.75, 1.0)])]],
    5: [[("l", [(0.9, 0.0), (0.2, 0.0), (0.15, 0.45)]),
         ("s", [(0.15, 0.45), (0.5, 0.37), (0.85, 0.5), (0.95, 0.72), (0.8, 0.95), (0.45, 1.0),
                (0.05, 0.88)])],
        [("l", [(0.2, 0.0), (0.15, 0.45)]),
         ("s", [(0.15, 0.45), (0.5, 0.37), (0.85, 0.5), (0.95, 0.72), (0.8, 0.95), (0.45, 1.0),
                (0.05, 0.88)]), ("l", [(0.2, 0.0), (0.95, 0.0)])]],
    6: [[("s", [(0.8, 0.03), (0.45, 0.0), (0.15, 0.3), (0.05, 0.65), (0.2, 0.95), (0.5, 1.0),
                (0.85, 0.85), (0.9, 0.62), (0.6, 0.45), (0.25, 0.5), (0.08, 0.7)])],
        [("s", [(0.7, 0.0), (0.35, 0.3), (0.1, 0.7), (0.3, 1.0), (0.75, 0.95), (0.9, 0.7),
                (0.6, 0.5), (0.25, 0.6), (0.12, 0.75)])]],
    7: [[("l", [(0.0, 0.0), (1.0, 0.0), (0.35, 1.0)])],
        [("l", [(0.0, 0.0), (1.0, 0.0), (0.4, 1.0)]), ("l", [(0.3, 0.5), (0.9, 0.5)])],
        [("l", [(0.0, 0.12), (0.05, 0.0), (1.0, 0.0)]), ("s", [(1.0, 0.0), (0.7, 0.4),
                                                               (0.5, 1.0)])]],
    8: [[("s", [(0.5, 0.47), (0.85, 0.3), (0.8, 0.05), (0.5, 0.0), (0.2, 0.05), (0.15, 0.3),
                (0.5, 0.47), (0.9, 0.7), (0.85, 0.95), (0.5, 1.0), (0.15, 0.95), (0.1, 0.7),
                (0.5, 0.47)])],
        [("s", [(0.85, 0.15), (0.5, 0.0), (0.15, 0.15), (0.25, 0.38), (0.8, 0.6),
                (0.9, 0.85), (0.5, 1.0), (0.1, 0.85), (0.2, 0.6), (0.75, 0.38), (0.85, 0.15)])]],
    9: [[("s", [(0.9, 0.3), (0.6, 0.5), (0.2, 0.48), (0.05, 0.25), (0.3, 0.0), (0.7, 0.0),
                (0.9, 0.25)]), ("l", [(0.9, 0.25), (0.85, 1.0)])],
        [("s", [(0.9, 0.3), (0.6, 0.5), (0.2, 0.48), (0.05, 0.25), (0.3, 0.0), (0.7, 0.0),
                (0.9, 0.25), (0.88, 0.7), (0.6, 1.0), (0.25, 0.95)])]],
}
ASPECT = {0: (0.55, 0.8), 1: (0.15, 0.45), 4: (0.6, 0.85), 7: (0.55, 0.8)}


def _spline(points: np.ndarray, per_segment: int = 24) -> np.ndarray:
    """Catmull-Rom through the points (ends repeated)."""
    p = np.vstack([points[:1], points, points[-1:]])
    out = []
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(p[-2:-1])
    return np.vstack(out)


def stroke_digit(digit: int, rng: np.random.Generator) -> tuple[np.ndarray, float] | None:
    """Ink coverage (float 0..1, CANVAS x CANVAS) of a digit drawn along jittered paths, and
    its stroke width in pixels."""
    variants = TEMPLATES[digit]
    strokes = variants[rng.integers(len(variants))]
    height = rng.uniform(0.4, 0.9) * CANVAS
    width_px = rng.uniform(4, 30)
    lo, hi = ASPECT.get(digit, (0.5, 0.75))
    aspect = rng.uniform(lo, hi)
    slant = rng.uniform(-0.15, 0.3)
    angle = np.deg2rad(rng.uniform(-6, 6))
    paths = []
    for kind, pts in strokes:
        pts = np.asarray(pts, np.float64) + rng.normal(0, 0.025, (len(pts), 2))
        path = _spline(pts) if kind == "s" else pts
        x = path[:, 0] * aspect + slant * (0.5 - path[:, 1])
        y = path[:, 1]
        c, s = np.cos(angle), np.sin(angle)
        paths.append(np.stack([c * x - s * y, s * x + c * y], 1))
    allp = np.vstack(paths)
    span = allp.max(0) - allp.min(0)
    scale = (height - width_px) / max(span[1], 1e-6)
    extent = span * scale + width_px
    if extent[0] > CANVAS * 0.98:
        return None
    offset = np.array([rng.uniform(0, CANVAS - extent[0]), rng.uniform(0, CANVAS - extent[1])])
    ss = 2  # supersampling: browsers anti-alias their strokes
    img = Image.new("L", (CANVAS * ss, CANVAS * ss), 0)
    draw = ImageDraw.Draw(img)
    r = width_px * ss / 2
    for path in paths:
        pts = ((path - allp.min(0)) * scale + width_px / 2 + offset) * ss
        # a round brush stamped along the path every quarter radius (a clean, even stroke)
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            n = max(1, int(np.ceil(np.hypot(*(b - a)) / max(0.5, r / 4))))
            for t in np.linspace(0, 1, n, endpoint=False):
                x, y = a + (b - a) * t
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        x, y = pts[-1]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    img = img.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return np.asarray(img, np.float32) / 255.0, width_px


def _fonts() -> list[Path]:
    return sorted(p for d in FONT_DIRS if d.is_dir() for p in d.glob("*.ttf")
                  if "Math" not in p.name)


def stroke_width(coverage: np.ndarray) -> float:
    """Mean stroke width of an ink image: twice the area over the perimeter."""
    m = coverage > 0.5
    perimeter = (m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum()
    return 2.0 * m.sum() / max(1, perimeter)


def font_digit(digit: int, rng: np.random.Generator, fonts: list[Path]) -> tuple | None:
    """Ink coverage of a digit rendered from a font (optionally thickened), rescaled to a
    random height and placed anywhere; None when its strokes fall outside 4-30 px."""
    font = fonts[rng.integers(len(fonts))]
    size = 400
    extra = int(rng.choice([0, 0, rng.integers(1, 25)]))
    img = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(img).text((size // 2, size // 4), str(digit), fill=255,
                             font=ImageFont.truetype(str(font), size), stroke_width=extra,
                             stroke_fill=255)
    glyph = img.crop(img.getbbox())
    angle = rng.uniform(-8, 8)
    glyph = glyph.rotate(angle, Image.Resampling.BILINEAR, expand=True)
    glyph = glyph.crop(glyph.getbbox())
    height = rng.uniform(0.4, 0.9) * CANVAS
    scale = height / glyph.height
    w = max(1, round(glyph.width * scale))
    if w > CANVAS * 0.98:
        return None
    glyph = glyph.resize((w, round(height)), Image.Resampling.LANCZOS)
    cover = np.asarray(glyph, np.float32) / 255.0
    sw = stroke_width(cover)
    if not 4 <= sw <= 30:
        return None
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    y = rng.integers(0, CANVAS - cover.shape[0] + 1)
    x = rng.integers(0, CANVAS - cover.shape[1] + 1)
    canvas[y : y + cover.shape[0], x : x + cover.shape[1]] = cover
    return np.clip(canvas, 0, 1), sw, font.stem


def drawing_png(coverage: np.ndarray, dark_on_light: bool) -> bytes:
    pixels = (255 * (1 - coverage) if dark_on_light else 255 * coverage).round()
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def photo_jpeg(coverage: np.ndarray, rng: np.random.Generator) -> bytes:
    """The drawing written in dark ink on grey paper and photographed: rotated, lit unevenly,
    blurred, noisy, JPEG-compressed."""
    angle = rng.uniform(-10, 10)
    cover = Image.fromarray((coverage * 255).astype(np.uint8), "L").rotate(
        angle, Image.Resampling.BILINEAR)
    alpha = np.asarray(cover, np.float32) / 255.0
    paper = rng.uniform(150, 235)
    ink = rng.uniform(10, min(90, paper - 70))
    img = paper * (1 - alpha) + ink * alpha
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * xx + np.sin(theta) * yy  # -0.7..0.7
    low = rng.uniform(0.55, 0.85)  # the dark side gets this fraction of the light
    gain = 1 + (1 - low) * (ramp / 0.7 - 1) / 2 * 1.0
    vignette = 1 - rng.uniform(0, 0.25) * (xx**2 + yy**2) * 2
    img = img * gain * vignette
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(
        ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    img = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(2, 10), (CANVAS, CANVAS))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "L").convert("RGB").save(
        buf, "JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def make_set(n: int = 500, seed: int = 0) -> list[dict]:
    """n drawings (balanced over 0-9, half fonts, half stroke paths) and their photographs."""
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    items = []
    for i in range(n):
        digit = i % 10
        use_font = (i // 10) % 2 == 0 and fonts
        while True:
            made = font_digit(digit, rng, fonts) if use_font else stroke_digit(digit, rng)
            if made is not None:
                break
        coverage, sw = made[0], made[1]
        dark = bool(rng.random() < 0.75)
        items.append({"label": str(digit), "kind": made[2] if use_font else "strokes",
                      "stroke_px": round(float(sw), 1), "dark_on_light": dark,
                      "drawing": drawing_png(coverage, dark), "photo": photo_jpeg(coverage, rng)})
    return items


# -- serving -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_top1(bundle: Path, images: list[bytes], labels: list[str]) -> tuple[float, list]:
    """Start `imgrec serve bundle`, POST every image to /v1/predict, stop it."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([*IMGREC, "serve", str(bundle), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"imgrec serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("imgrec serve did not start in 120 s")
            time.sleep(0.3)
        predicted = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for data in images:
                r = client.post("/v1/predict?top_k=1", content=data)
                r.raise_for_status()
                predicted.append(r.json()["predictions"][0]["label"])
    finally:
        proc.terminate()
        proc.wait(30)
    acc = float(np.mean([p == t for p, t in zip(predicted, labels, strict=True)]))
    return acc, predicted


def mnist_png_accuracy(bundle: Path, fit: str) -> float:
    """The MNIST test digits written as PNG files and read back through the contract (load_input)
    with this fit: the digit fit must leave real MNIST digits as good as they were."""
    from imgrec.bundle import read_bundle
    from imgrec.contract import load_input
    from imgrec.data.builtins import read_idx
    from imgrec.predict import Predictor

    folder = mnist_dir()
    x = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    y = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    b = read_bundle(bundle, need_weights=False)
    b.preprocess = b.preprocess.replace(fit=fit)
    predictor = Predictor(b, engine="onnx")
    pixels = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, "PNG")
        pixels.append(load_input(buf.getvalue(), b.preprocess))
    probs = predictor.probabilities(np.stack(pixels), batch_size=500)
    return float((probs.argmax(1) == y).mean())


def with_fit(bundle: Path, fit: str, dest: Path) -> Path:
    """A copy of the bundle whose contract says fit=`fit` (fit "none": as bundles were)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("checkpoint.pt", "events.*"))
    meta = json.loads((dest / "imgrec.json").read_text())
    meta["preprocess"]["fit"] = fit
    (dest / "imgrec.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="an MNIST bundle to use instead of training one")
    ap.add_argument("--save-images", help="write the drawings and photographs here")
    ap.add_argument("-n", type=int, default=500)
    args = ap.parse_args()

    items = make_set(args.n, seed=0)
    labels = [it["label"] for it in items]
    if args.save_images:
        out = Path(args.save_images)
        out.mkdir(parents=True, exist_ok=True)
        for i, it in enumerate(items):
            (out / f"{i:03d}-{it['label']}-drawing.png").write_bytes(it["drawing"])
            (out / f"{i:03d}-{it['label']}-photo.jpg").write_bytes(it["photo"])

    train_s = None
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        bundle = WORK / "digits-mnist-bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        env = {"IMGREC_DATA": str(mnist_dir().parent)}
        train_s, stdout = timed([*IMGREC, "train", "mnist", "--out", str(bundle), "--json"],
                                env=env)
        print(f"imgrec train mnist: {train_s:.0f} s, test accuracy "
              f"{json.loads(stdout)['test']['accuracy']:.4f}")
    meta = json.loads((bundle / "imgrec.json").read_text())
    recorded = meta["preprocess"].get("fit", "none")
    if not (bundle / "model.onnx").exists():
        timed([*IMGREC, "export", str(bundle)])

    result: dict = {"n": len(items), "bundle_fit": recorded,
                    "mnist_test_acc": (meta.get("metrics") or {}).get("test", {}).get("accuracy")}
    if train_s is not None:
        result["train_s"] = round(train_s, 1)
    sets = {"drawings": [it["drawing"] for it in items], "photos": [it["photo"] for it in items]}
    for fit in ("none", "digit"):
        served = with_fit(bundle, fit, WORK / f"digits-served-{fit}")
        for name, images in sets.items():
            acc, predicted = served_top1(served, images, labels)
            result[f"{name}_top1_fit_{fit}"] = round(acc, 4)
            wrong = [i for i, (p, t) in enumerate(zip(predicted, labels, strict=True)) if p != t]
            result[f"{name}_wrong_fit_{fit}"] = [
                f"{i}:{labels[i]}->{predicted[i]} ({items[i]['kind']}, "
                f"{items[i]['stroke_px']} px)" for i in wrong][:60]
            print(f"fit={fit:5s} {name:8s}: top-1 {acc:.1%} over {len(images)}")
        result[f"mnist_png_top1_fit_{fit}"] = round(mnist_png_accuracy(served, fit), 4)
        print(f"fit={fit:5s} MNIST test digits as PNG files: "
              f"top-1 {result[f'mnist_png_top1_fit_{fit}']:.2%}")
    result["pass"] = (result["drawings_top1_fit_digit"] >= 0.95
                      and result["photos_top1_fit_digit"] >= 0.90)
    print(f"targets: drawings >= 95%, photographs >= 90%: "
          f"{'met' if result['pass'] else 'NOT met'}")
    write_result("digit_drawings", result)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
