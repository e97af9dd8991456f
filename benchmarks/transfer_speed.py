"""Transfer learning end to end, as a user runs it (issue 12): whole processes of

    imgrec train DIR --model efficientnet_lite0 --mode features --out RUN
    imgrec evaluate RUN DIR            (the test split)

on DIR = train/ val/ test/ x cat/ dog/ of 4000 / 2000 / 2000 JPEGs of 300-500 px, timed from
outside, first with a cold feature cache (no features, no backbone ONNX), then warm.

The images are made from ../shared/data/cats-dogs-mini (600 real photos, <= 256 px): each
class's photos are shuffled and split 50 / 25 / 25 % between train, val and test *before*
augmenting, so no test image derives from a photo seen in training or validation. Each image
is a small rotation, a random crop (45-100 % of the area, aspect 3:4-4:3), a mirror flip
half of the time, colour jitter (brightness, contrast, saturation 0.75-1.25), a resize to
both sides within 300-500 px and a JPEG at quality 85-95. They are built once into
benchmarks/work/ (git-ignored) and reused while the spec matches.

Figures: train and evaluate seconds (whole processes), their sum, feature extraction
images/s (decoding included, from the bundle's record), evaluate images/s (from its JSON),
test accuracy; evaluate runs twice: as a user gets it (reusing the feature cache training
filled) and with an empty cache (every image decoded and run through model.onnx).

Targets (issue 12, 2 cores): train + evaluate <= 100 s, extraction >= 100 images/s,
evaluate of a transfer bundle >= 90 images/s. Writes benchmarks/results/transfer_speed.json.

    .venv/bin/python benchmarks/transfer_speed.py                               # full size
    .venv/bin/python benchmarks/transfer_speed.py --train 200 --val 100 --test 100   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "transfer_speed.json"
IMGREC = str(Path(sys.executable).with_name("imgrec"))
TARGETS = {"train_plus_evaluate_s": 100.0, "extract_images_per_s": 100.0,
           "evaluate_images_per_s": 90.0}
SPLIT_SHARES = {"train": 0.5, "val": 0.25, "test": 0.25}  # of each class's source photos


def source_photos(seed: int) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> source photos: every photo of the mini set (its train and validation
    folders alike), shuffled per class and dealt to exactly one split."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (SOURCE / "train").iterdir() if p.is_dir())
    out: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLIT_SHARES}
    for cls in classes:
        photos = sorted(p for sub in ("train", "validation")
                        for p in (SOURCE / sub / cls).glob("*.jpg"))
        photos = [photos[i] for i in rng.permutation(len(photos))]
        n_train = int(len(photos) * SPLIT_SHARES["train"])
        n_val = int(len(photos) * SPLIT_SHARES["val"])
        out["train"][cls] = photos[:n_train]
        out["val"][cls] = photos[n_train : n_train + n_val]
        out["test"][cls] = photos[n_train + n_val :]
    return out


def augmented(photo: Path, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One new picture of a photo (rotation, crop, flip, colour, 300-500 px) and its JPEG
    quality."""
    with Image.open(photo) as im:
        img = im.convert("RGB")
    angle = float(rng.uniform(-10, 10))
    w, h = img.size
    img = img.rotate(angle, Image.Resampling.BICUBIC)
    # the largest centred rectangle of the same aspect with no corner left empty
    t = np.radians(abs(angle))
    keep = 1 / (np.cos(t) + np.sin(t) * max(w / h, h / w))
    cw, ch = w * keep, h * keep
    img = img.crop((round((w - cw) / 2), round((h - ch) / 2), round((w + cw) / 2),
                    round((h + ch) / 2)))
    w, h = img.size
    area, aspect = rng.uniform(0.45, 1.0) * w * h, np.exp(rng.uniform(np.log(3 / 4),
                                                                      np.log(4 / 3)))
    cw, ch = min(w, round(np.sqrt(area * aspect))), min(h, round(np.sqrt(area / aspect)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.75, 1.25)))
    ratio = max(img.size) / min(img.size)
    ratio = min(ratio, 500 / 300)
    long_side = rng.uniform(300 * ratio, 500)  # both sides within 300-500 px
    short_side = max(300, round(long_side / ratio))
    w, h = img.size
    size = (round(long_side), short_side) if w >= h else (short_side, round(long_side))
    img = img.resize(size, Image.Resampling.LANCZOS)
    return img, int(rng.integers(85, 96))


def build_dataset(dest: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """DIR/{train,val,test}/<class>/*.jpg, or the existing copy when its spec matches."""
    spec = {"source": str(SOURCE), "counts": counts, "seed": seed, "v": 2}
    marker = dest / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    photos = source_photos(seed)
    for s_i, (split, n) in enumerate(counts.items()):
        classes = sorted(photos[split])
        for c_i, cls in enumerate(classes):
            rng = np.random.default_rng([seed, s_i, c_i])
            want = n // len(classes) + (1 if c_i < n % len(classes) else 0)
            out = dest / split / cls
            out.mkdir(parents=True)
            pool = photos[split][cls]
            for i in range(want):
                img, quality = augmented(pool[i % len(pool)], rng)
                img.save(out / f"{cls}_{i:05d}.jpg", quality=quality)
    marker.write_text(json.dumps(spec) + "\n")
    return dest


def run(cmd: list[str], cache: Path) -> tuple[float, str]:
    """A whole process with IMGREC_CACHE = cache, timed from outside: (seconds, stdout)."""
    env = {**os.environ, "IMGREC_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def train(data: Path, out: Path, cache: Path) -> dict:
    """`imgrec train DIR --model efficientnet_lite0 --mode features` (the default options)."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, stdout = run([IMGREC, "train", str(data), "--model", "efficientnet_lite0",
                           "--mode", "features", "--out", str(out), "--json"], cache)
    summary = json.loads(stdout)
    t = json.loads((out / "imgrec.json").read_text())["training"]
    return {"seconds": round(seconds, 1), "test_accuracy": summary["test"]["accuracy"],
            "test_n": summary["test"]["n"], "val_acc": summary["history"][
                t["best_epoch"] - 1].get("val_acc"),
            "features_computed": t["features_computed"], "features_cached": t["features_cached"],
            "extract_seconds": t["extract_seconds"],
            "extract_images_per_s": t.get("extract_images_per_s"),
            "extract_lanes": t.get("extract_lanes"),
            "model_onnx": (out / "model.onnx").is_file(), "onnx_seconds": t.get("onnx_seconds")}


def evaluate(bundle: Path, data: Path, cache: Path) -> dict:
    """`imgrec evaluate BUNDLE DIR` (the test split), its figures from its --json file."""
    metrics = bundle.with_name(bundle.name + "-eval.json")
    metrics.unlink(missing_ok=True)
    seconds, _ = run([IMGREC, "evaluate", str(bundle), str(data), "--json", str(metrics),
                      "--out", str(bundle.with_name(bundle.name + "-eval"))], cache)
    m = json.loads(metrics.read_text())
    return {"seconds": round(seconds, 1), "accuracy": m["accuracy"], "n": m["n"],
            "scoring_seconds": m.get("seconds"), "images_per_s": m.get("images_per_s"),
            "from_feature_cache": m.get("from_feature_cache", 0), "engine": m.get("engine")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4000, help="training images")
    ap.add_argument("--val", type=int, default=2000, help="validation images")
    ap.add_argument("--test", type=int, default=2000, help="test images")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (SOURCE / "train").is_dir():
        sys.exit(f"{SOURCE} is absent: the benchmark builds its images from it")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    t0 = time.perf_counter()
    data = build_dataset(WORK / f"cats-dogs-{args.train}-{args.val}-{args.test}", counts)
    print(f"dataset {data} ({time.perf_counter() - t0:.1f}s to build or check)", flush=True)
    cache, empty = WORK / "transfer-feature-cache", WORK / "transfer-empty-cache"
    for folder in (cache, empty):
        shutil.rmtree(folder, ignore_errors=True)  # cold: no features, no backbone export
    bundle = WORK / "transfer-run"
    cold = train(data, bundle, cache)
    print(f"train (cold cache) {cold['seconds']:.1f}s: extraction "
          f"{cold['extract_images_per_s']} images/s, test accuracy {cold['test_accuracy']:.4f}",
          flush=True)
    ev = evaluate(bundle, data, cache)
    print(f"evaluate           {ev['seconds']:.1f}s: {ev['images_per_s']} images/s "
          f"({ev['from_feature_cache']} of {ev['n']} from the feature cache), accuracy "
          f"{ev['accuracy']:.4f}", flush=True)
    ev_full = evaluate(bundle, data, empty)
    print(f"evaluate (no cache) {ev_full['seconds']:.1f}s: {ev_full['images_per_s']} images/s "
          f"through {ev_full['engine']}, accuracy {ev_full['accuracy']:.4f}", flush=True)
    warm = train(data, WORK / "transfer-run-warm", cache)
    print(f"train (warm cache) {warm['seconds']:.1f}s", flush=True)
    total = cold["seconds"] + ev["seconds"]
    print(f"train + evaluate   {total:.1f}s (target <= {TARGETS['train_plus_evaluate_s']:g}); "
          f"without the cache reuse {cold['seconds'] + ev_full['seconds']:.1f}s")
    result = {
        "benchmark": "transfer_speed",
        "commands": ["imgrec train DIR --model efficientnet_lite0 --mode features --out RUN",
                     "imgrec evaluate RUN DIR"],
        "dataset": {"path": str(data.relative_to(ROOT)), **counts, "side_px": [300, 500],
                    "made_from": "cats-dogs-mini: source photos split 50/25/25 between "
                                 "train/val/test, then rotation +-10 deg, crops 45-100%, "
                                 "flips, colour jitter, 300-500 px, JPEG q85-95"},
        "train_cold": cold, "evaluate": ev, "evaluate_no_cache": ev_full, "train_warm": warm,
        "train_plus_evaluate_s": round(total, 1),
        "train_plus_evaluate_no_cache_s": round(cold["seconds"] + ev_full["seconds"], 1),
        "targets": TARGETS,
        "meets_targets": {
            "train_plus_evaluate_s": total <= TARGETS["train_plus_evaluate_s"],
            "extract_images_per_s": (cold["extract_images_per_s"] or 0)
            >= TARGETS["extract_images_per_s"],
            "evaluate_images_per_s": (ev_full["images_per_s"] or 0)
            >= TARGETS["evaluate_images_per_s"]},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "full_size": counts == {"train": 4000, "val": 2000, "test": 2000},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
