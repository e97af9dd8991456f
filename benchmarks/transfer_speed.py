"""Transfer-learning speed: `imgrec train DIR --model efficientnet_lite0 --mode features`
end to end (features, head, bundle, test evaluation) on 4000 training + 2000 test JPEGs of at
least 224 px, first with a cold feature cache, then warm.

The images are made from ../shared/data/cats-dogs-mini: random crops (60-100 % of the area),
mirror flips and sizes 256-320 px of its photos, re-encoded as JPEG — training images from its
training photos, test images from its validation photos only (no leakage). They land in
benchmarks/work/ (git-ignored) and are reused while the spec matches.

Targets (issue 3, a 2-core CPU): cold < 150 s, warm <= cold / 5.
Writes benchmarks/results/transfer_speed.json.

    .venv/bin/python benchmarks/transfer_speed.py              # full size
    .venv/bin/python benchmarks/transfer_speed.py --train 160 --test 40   # smoke test
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "transfer_speed.json"
TARGET_COLD_S = 150.0
TARGET_WARM_RATIO = 5.0


def build_dataset(dest: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """DIR/{train,test}/<class>/*.jpg from the mini set's photos, or the existing copy."""
    spec = {"source": str(SOURCE), "train": n_train, "test": n_test, "seed": seed, "v": 1}
    marker = dest / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, src_split, n in (("train", "train", n_train), ("test", "validation", n_test)):
        classes = sorted(p.name for p in (SOURCE / src_split).iterdir() if p.is_dir())
        for c_i, cls in enumerate(classes):
            photos = sorted((SOURCE / src_split / cls).glob("*.jpg"))
            want = n // len(classes) + (1 if c_i < n % len(classes) else 0)
            out = dest / split / cls
            out.mkdir(parents=True)
            for i in range(want):
                with Image.open(photos[i % len(photos)]) as im:
                    img = im.convert("RGB")
                w, h = img.size
                frac = np.sqrt(rng.uniform(0.6, 1.0))
                cw, ch = int(w * frac), int(h * frac)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                short = int(rng.integers(256, 321))
                scale = short / min(img.size)
                img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)),
                                 Image.Resampling.BICUBIC)
                img.save(out / f"{cls}_{i:05d}.jpg", quality=90)
    marker.write_text(json.dumps(spec) + "\n")
    return dest


def timed_train(data: Path, out: Path, cache: Path) -> dict:
    """One `imgrec train` in a fresh process (imports and all), timed from outside."""
    env = {**os.environ, "IMGREC_CACHE": str(cache)}
    cmd = [str(Path(sys.executable).with_name("imgrec")), "train", str(data), "--model",
           "efficientnet_lite0", "--mode", "features", "--out", str(out), "--json",
           "--no-tensorboard"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"imgrec train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    training = json.loads((out / "imgrec.json").read_text())["training"]
    return {"seconds": round(seconds, 1), "test_accuracy": summary["test"]["accuracy"],
            "test_n": summary["test"]["n"], "features_computed": training["features_computed"],
            "features_cached": training["features_cached"],
            "extract_seconds": training["extract_seconds"],
            "val_acc": summary["history"][training["best_epoch"] - 1].get("val_acc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4000, help="training images")
    ap.add_argument("--test", type=int, default=2000, help="test images")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (SOURCE / "train").is_dir():
        sys.exit(f"{SOURCE} is absent: the benchmark builds its images from it")
    t0 = time.perf_counter()
    data = build_dataset(WORK / f"cats-dogs-{args.train}-{args.test}", args.train, args.test)
    print(f"dataset {data} ({time.perf_counter() - t0:.1f}s to build or check)", flush=True)
    cache = WORK / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold: no features, no ONNX export
    cold = timed_train(data, WORK / "run-cold", cache)
    print(f"cold    {cold['seconds']:.1f}s  test accuracy {cold['test_accuracy']:.4f}", flush=True)
    warm = timed_train(data, WORK / "run-warm", cache)
    print(f"warm    {warm['seconds']:.1f}s  test accuracy {warm['test_accuracy']:.4f}", flush=True)
    ratio = cold["seconds"] / warm["seconds"]
    result = {
        "benchmark": "transfer_speed",
        "command": "imgrec train DIR --model efficientnet_lite0 --mode features",
        "dataset": {"path": str(data.relative_to(ROOT)), "train": args.train,
                    "test": args.test, "min_side_px": 256,
                    "made_from": "cats-dogs-mini photos: crops 60-100%, flips, 256-320 px"},
        "cold": cold, "warm": warm, "cold_over_warm": round(ratio, 2),
        "targets": {"cold_s": TARGET_COLD_S, "warm_ratio": TARGET_WARM_RATIO},
        "meets_targets": {"cold": cold["seconds"] < TARGET_COLD_S,
                          "warm": ratio >= TARGET_WARM_RATIO},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m": os.getloadavg()[0]},
        "full_size": args.train >= 4000 and args.test >= 2000,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cold/warm {ratio:.1f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
