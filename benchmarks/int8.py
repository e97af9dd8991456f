"""int8 Lite0 against float32: throughput at batch 32 and top-1 agreement on every photo here.

The offline ImageNet model (efficientnet_lite0, `imgrec serve`'s default bundle) is quantized
exactly as `imgrec export imagenet --int8` does it (that bundle names no training data, so it is
calibrated on crops and mirrors of the few photos every machine has: imgrec's samples,
scikit-learn's and matplotlib's), and so is, with --transfer, a copy of a Lite0 transfer bundle
(the workshop's flow: `imgrec train DIR --model efficientnet_lite0 --mode features`, then
export --int8, calibrated on its own training data); then both ONNX files run through the
same Predictor (contract, TTA, temperature) on the cats-dogs-mini set's 600 photos and every
scikit-image photo that loads offline. Throughput: the ONNX Runtime engine imgrec uses (every
core, no spinning) on a batch of 32 photos, float32 and int8 alternating for --rounds rounds;
the median of each. Targets: int8 >= 1.6x float32 images/s, agreement >= 97%. Writes
benchmarks/results/int8.json.

    python benchmarks/int8.py                       # the measurement
    python benchmarks/int8.py --seconds 2 --rounds 1  # a smoke run
    python benchmarks/int8.py --no-export           # reuse the bundle's model.int8.onnx
    python benchmarks/int8.py --transfer benchmarks/work/transfer-run  # and a transfer bundle
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "int8.json"
MINI = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
#: scikit-image's photographs (synthetic images such as the colour wheel, the logo or the
#: horse silhouette are left out); those needing a download are skipped with a note
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee",
                  "coins", "eagle", "grass", "gravel", "hubble_deep_field",
                  "immunohistochemistry", "lily", "microaneurysms", "moon", "page", "retina",
                  "rocket", "skin", "stereo_motorcycle", "text")
TARGET_RATIO, TARGET_AGREEMENT = 1.6, 0.97


def skimage_photos() -> tuple[dict[str, bytes], list[str]]:
    """{name: PNG bytes} of the scikit-image photos available offline, and the names skipped."""
    import skimage.data
    from PIL import Image

    photos, skipped = {}, []
    for name in SKIMAGE_PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # needs pooch and a download: not here
            skipped.append(name)
            continue
        arrays = {name: arr} if not isinstance(arr, tuple) else \
            {f"{name}_{i}": a for i, a in enumerate(arr) if a.ndim == 3}
        for key, a in arrays.items():
            buf = io.BytesIO()
            Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
            photos[key] = buf.getvalue()
    return photos, skipped


def load_sets(contract) -> dict[str, tuple[list[str], np.ndarray]]:
    """{set: (names, uint8 pixels through the contract)}."""
    from imgrec.contract import load_input
    from imgrec.predict import decode_many

    sets = {}
    if MINI.is_dir():
        files = sorted(str(p) for p in MINI.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg",
                                                                                 ".png"))
        pixels = decode_many(lambda f: load_input(f, contract), files)
        good = [(f, p) for f, p in zip(files, pixels, strict=True) if isinstance(p, np.ndarray)]
        sets["cats-dogs-mini"] = ([str(Path(f).relative_to(MINI)) for f, _ in good],
                                  np.stack([p for _, p in good]))
    photos, skipped = skimage_photos()
    sets["skimage"] = (list(photos), np.stack([load_input(b, contract) for b in photos.values()]))
    sets["skimage"][0].extend(f"(skipped: {n})" for n in skipped)
    return sets


def agreement(bundle, int8_path: Path, sets: dict) -> dict:
    """Top-1 agreement per set and over all photos, through the same Predictor."""
    from imgrec.predict import OnnxEngine, Predictor

    fp32 = Predictor(bundle, engine=OnnxEngine(bundle))
    int8 = Predictor(bundle, engine=OnnxEngine(bundle, path=int8_path))
    out, total, same_total = {}, 0, 0
    for name, (names, pixels) in sets.items():
        a, b = fp32.probabilities(pixels, 32), int8.probabilities(pixels, 32)
        same = a.argmax(1) == b.argmax(1)
        photo_names = [n for n in names if not n.startswith("(skipped")]
        out[name] = {"photos": len(pixels), "agreement": round(float(same.mean()), 4),
                     "max_abs_diff": round(float(np.abs(a - b).max()), 4),
                     "disagree": [n for n, s in zip(photo_names, same, strict=True) if not s],
                     "skipped": [n[10:-1] for n in names if n.startswith("(skipped")]}
        total += len(pixels)
        same_total += int(same.sum())
    out["all"] = {"photos": total, "agreement": round(same_total / total, 4)}
    return out


def throughput(bundle, int8_path: Path, pixels: np.ndarray, rounds: int, seconds: float) -> dict:
    """Images/s at batch 32, float32 and int8 alternating; the median of the rounds."""
    from imgrec.benchmarking import time_engine
    from imgrec.predict import OnnxEngine

    x = np.ascontiguousarray(bundle.preprocess.normalize(np.resize(pixels, (32,
                                                                            *pixels.shape[1:]))))
    engines = {"fp32": OnnxEngine(bundle), "int8": OnnxEngine(bundle, path=int8_path)}
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            rates[name].append(round(time_engine(engine, x, seconds)[1], 2))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    print(f"batch 32: float32 {med['fp32']:.1f} images/s, int8 {med['int8']:.1f} images/s "
          f"(rounds: {rates})", flush=True)
    return {"batch_size": 32, "rounds": rates, "fp32_images_per_s": med["fp32"],
            "int8_images_per_s": med["int8"], "ratio": round(med["int8"] / med["fp32"], 3),
            "threads": engines["fp32"].session.get_session_options().intra_op_num_threads}


def measure(model: str, args, sets_cache: dict) -> dict:
    """Export (unless --no-export), agreement on every photo, throughput: one model's record."""
    import imgrec.export
    from imgrec.export import export_bundle
    from imgrec.predict import int8_onnx_path
    from imgrec.zoo import open_bundle

    export = None
    if not args.no_export:
        t = time.perf_counter()
        r = export_bundle(model, int8=True, calibration=args.calibration)
        export = {"seconds": round(time.perf_counter() - t, 1), **r.to_dict()}
        print(f"{model}: exported in {export['seconds']} s; calibrated on {r.int8_calibration}"
              f"; its own agreement check: {r.int8_top1_agreement:.2%} of "
              f"{r.int8_agreement_images}", flush=True)
    bundle = open_bundle(model, need_weights=False)
    path = int8_onnx_path(bundle, model)
    key = repr(bundle.preprocess)
    if key not in sets_cache:  # decoded once per contract
        sets_cache[key] = load_sets(bundle.preprocess)
    sets = sets_cache[key]
    agree = agreement(bundle, path, sets)
    for name, a in agree.items():
        print(f"{model}: agreement {name}: {a['agreement']:.2%} of {a['photos']} photos"
              + (f" (differ: {', '.join(a['disagree'][:8])})" if a.get("disagree") else ""))
    speed = throughput(bundle, path, sets["skimage"][1], args.rounds, args.seconds)
    met = speed["ratio"] >= TARGET_RATIO and all(
        a["agreement"] >= TARGET_AGREEMENT for a in agree.values())
    print(f"{model}: int8 / float32 at batch 32: {speed['ratio']:.2f}x (target >= "
          f"{TARGET_RATIO}x, agreement >= {TARGET_AGREEMENT:.0%} on every set: "
          f"{'met' if met else 'NOT met'})", flush=True)
    settings = {"first_float_convs": imgrec.export.INT8_FLOAT_FIRST_CONVS,
                "float_depthwise": imgrec.export.INT8_FLOAT_DEPTHWISE,
                "percentile": imgrec.export.INT8_PERCENTILE,
                "float_pooling": imgrec.export.INT8_FLOAT_POOLING,
                "calibration_views": imgrec.export.CALIBRATION_VIEWS,
                "bias_correction": imgrec.export.INT8_BIAS_CORRECTION}
    return {"model": model, "int8_file": path.name, "settings": settings, "export": export,
            "quantization": (bundle.extra.get("export") or {}), "agreement": agree,
            "throughput": speed, "target_met": met}


def transfer_copy(src: Path, workdir: Path) -> str:
    """A copy of the transfer bundle to export into (the original is left as it is)."""
    import shutil

    if not (src / "imgrec.json").is_file():
        raise SystemExit(f"--transfer: {src} is not a bundle (train one: imgrec train DIR "
                         "--model efficientnet_lite0 --mode features --out DIR)")
    dst = workdir / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.int8.onnx", "events.*"))
    return str(dst)


def overlap_note(bundle_dir: Path) -> str:
    """Whether the transfer bundle's training data was made from the cats-dogs-mini photos
    (then its calibration images are views of some of the photos the agreement is measured on;
    the scikit-image photos and the export's validation images stay unseen)."""
    data = json.loads((bundle_dir / "imgrec.json").read_text()).get("training", {}).get("data")
    spec = Path(str(data)) / "spec.json"
    source = json.loads(spec.read_text()).get("source") if spec.is_file() else None
    if source and Path(source).resolve() == MINI.resolve():
        return (f"its training data {data} was built from the cats-dogs-mini photos: the "
                "128 calibration images are views of some of them; unseen: the scikit-image "
                "photos and the export's validation images (quantization.int8_top1_agreement)")
    return f"calibrated on its training data {data}, not on these photos"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--transfer", type=Path,
                    help="also a Lite0 transfer bundle (exported in a temporary copy)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per engine per round")
    ap.add_argument("--no-export", action="store_true",
                    help="measure the bundle's model.int8.onnx as it is")
    ap.add_argument("--calibration", help="dataset to calibrate on (imgrec export --calibration)")
    ap.add_argument("--first-float-convs", type=int,
                    help="try another number of leading convolutions kept in float32")
    ap.add_argument("--float-depthwise", choices=["yes", "no"],
                    help="try the depthwise convolutions in float32 (yes)")
    ap.add_argument("--percentile", type=float,
                    help="try another calibration percentile (100: min/max)")
    ap.add_argument("--float-pooling", choices=["yes", "no"],
                    help="try the global pooling in int8 (no) or float32 (yes)")
    ap.add_argument("--views", type=int, help="try another number of views per offline photo")
    ap.add_argument("--bias-correction", choices=["yes", "no"],
                    help="try without the weights' bias correction (no)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import tempfile

    import imgrec.export

    if args.first_float_convs is not None:  # settings to try, instead of imgrec's
        imgrec.export.INT8_FLOAT_FIRST_CONVS = args.first_float_convs
    if args.float_depthwise is not None:
        imgrec.export.INT8_FLOAT_DEPTHWISE = args.float_depthwise == "yes"
    if args.float_pooling is not None:
        imgrec.export.INT8_FLOAT_POOLING = args.float_pooling == "yes"
    if args.percentile is not None:
        imgrec.export.INT8_PERCENTILE = None if args.percentile >= 100 else args.percentile
    if args.views is not None:
        imgrec.export.CALIBRATION_VIEWS = args.views
    if args.bias_correction is not None:
        imgrec.export.INT8_BIAS_CORRECTION = args.bias_correction == "yes"
    sets_cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"imagenet": args.model}
        if args.transfer:
            models["transfer"] = transfer_copy(args.transfer, Path(tmp))
        records = {k: measure(m, args, sets_cache) for k, m in models.items()}
    if args.transfer:
        records["transfer"]["model"] = str(args.transfer)
        records["transfer"]["held_out_note"] = overlap_note(args.transfer)
    result = {**records["imagenet"], "transfer": records.get("transfer"),
              "cpu_count": os.cpu_count(),
              "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "machine": platform.machine(), "python": platform.python_version(),
              "argv": sys.argv[1:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
