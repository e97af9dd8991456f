"""CIFAR-10: `imgrec train cifar10` (the default recipe) as a user runs it, whole process timed.

    .venv/bin/python benchmarks/cifar10.py [--only dev|full|long|cnn] [--cnn-epochs 10]

Two measurements (plus two optional ones):

- dev: accuracy. ../shared/data/cifar10-dev holds 10,000 real CIFAR-10 training images
  (data_batch_1.bin; JPEG-copied, so a point or two under the original files). Its first 8,000
  become `data_batch_1.bin` and its last 2,000 `test_batch.bin` of a data root under
  benchmarks/work/, so the recipe trains on 8,000 and is scored on 2,000 it never saw (the
  file is shuffled, ~200 per class). Nothing was tuned on CIFAR-10's real test set.
- full: wall time at full size. A 50,000 + 10,000 stand-in in CIFAR-10's binary layout (the
  dev images five times, each copy moved or mirrored differently, as data_batch_1..5.bin; the
  dev images as test_batch.bin), trained with `IMGREC_DATA=ROOT imgrec train cifar10`. Its
  accuracy means nothing (the test images are training images); its time is the figure.
- long (--only long or --with-long): `--recipe long` on the dev split.
- short (--only short): `--recipe short` on the dev split (the default where bfloat16 is slow:
  a CPU without AMX; with AMX the default is long).
- full-long (--only full-long): `--recipe long` on the 50k stand-in, wall time only.
- cnn (--only cnn): the workshop's cifar-cnn the workshop's way (RMSprop 1e-4, batch 32) on
  the dev split, for comparison.

Results: benchmarks/results/cifar10.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
from pathlib import Path

import numpy as np
from common import IMGREC, ROOT, WORK, clean, timed, write_result

DEV = ROOT.parent / "shared" / "data" / "cifar10-dev"
RECORD = 1 + 3 * 32 * 32
WORKSHOP = ["--model", "cifar-cnn", "--optimizer", "rmsprop", "--lr", "1e-4", "--batch-size",
            "32", "--augment", "shift=0.1,flip", "--label-smoothing", "0", "--weight-decay", "0",
            "--tta", "none", "--val-fraction", "0"]  # the workshop validates on test


def dev_records(data: Path) -> tuple[np.ndarray, str]:
    """The dev set's records (N x 3073 uint8) and its class names file."""
    src = data / "cifar-10-batches-bin"
    raw = np.fromfile(src / "data_batch_1.bin", dtype=np.uint8).reshape(-1, RECORD)
    meta = src / "batches.meta.txt"
    return raw, meta.read_text() if meta.exists() else ""


def write_root(root: Path, batches: dict[str, np.ndarray], meta: str) -> Path:
    """A data root holding cifar10/cifar-10-batches-bin/ with the given files."""
    folder = root / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in batches.items():
        records.tofile(folder / name)
    if meta:
        (folder / "batches.meta.txt").write_text(meta)
    return root


def dev_split_root(data: Path) -> Path:
    """8,000 to train (data_batch_1.bin), 2,000 held out (test_batch.bin)."""
    raw, meta = dev_records(data)
    return write_root(WORK / "data-cifar10-dev-8k-2k",
                      {"data_batch_1.bin": raw[:8000], "test_batch.bin": raw[8000:]}, meta)


def _variant(raw: np.ndarray, k: int) -> np.ndarray:
    """Copy k of the dev records: k=0 as is; then mirrored and/or rolled by a pixel or two,
    so the five training batches are not byte-identical."""
    labels, px = raw[:, :1], raw[:, 1:].reshape(-1, 3, 32, 32)
    if k % 2:
        px = px[..., ::-1]
    if k >= 2:
        px = np.roll(px, shift=(k // 2, -(k // 2)), axis=(2, 3))
    return np.concatenate([labels, px.reshape(len(raw), -1)], axis=1)


def standin_root(data: Path) -> Path:
    """The 50,000 + 10,000 stand-in with CIFAR-10's file layout and sizes."""
    raw, meta = dev_records(data)
    batches = {f"data_batch_{k + 1}.bin": _variant(raw, k) for k in range(5)}
    batches["test_batch.bin"] = raw
    return write_root(WORK / "data-cifar10-standin-50k", batches, meta)


def run(name: str, args: list[str], root: Path, via_env: bool = False) -> dict:
    """`imgrec train cifar10 ARGS` as a whole process: wall time, accuracy, epoch times."""
    out = WORK / f"cifar10-{name}"
    clean(out)
    data = [] if via_env else ["--data-dir", str(root)]
    cmd = [*IMGREC, "train", "cifar10", *data, *args, "--out", str(out), "--json"]
    env = {"IMGREC_DATA": str(root)} if via_env else None
    print(f"{name}: {'IMGREC_DATA=' + str(root) + ' ' if via_env else ''}imgrec "
          f"{' '.join(cmd[3:])}", flush=True)
    before, load = _children_cpu(), os.getloadavg()[0]
    wall, stdout = timed(cmd, env=env)
    cpu = _children_cpu() - before
    summary = json.loads(stdout)
    meta = json.loads((out / "imgrec.json").read_text())
    with (out / "history.csv").open() as f:
        epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
    t = meta["training"]
    result = {
        "command": "imgrec " + " ".join(["train", "cifar10", *args]),
        "model": meta["architecture"]["name"], "model_args": meta["architecture"]["args"],
        "epochs": t["epochs"], "batch_size": t["batch_size"], "optimizer": t["optimizer"],
        "lr": t["lr"], "splits": t["splits"], "wall_s": round(wall, 1),
        "train_s": t["seconds"], "epoch_s": [round(s, 1) for s in epoch_s],
        "cpu_s": round(cpu, 1), "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "test_acc": summary["test"]["accuracy"], "test_n": summary["test"]["n"],
    }
    print(f"{name}: {result['model']}, {result['epochs']} epochs on "
          f"{t['splits'].get('train')} images: accuracy {result['test_acc']:.4f} on "
          f"{result['test_n']} held-out images, {wall:.1f} s wall "
          f"({sum(epoch_s) / len(epoch_s):.1f} s per epoch); {cpu:.0f} CPU-s, load average "
          f"{load:.1f} before", flush=True)
    return result


def _children_cpu() -> float:
    """CPU seconds (user + system) used by finished child processes: on a shared machine the
    wall time is inflated by the others' load, the CPU time much less."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEV,
                    help="a folder holding cifar-10-batches-bin/data_batch_1.bin (default "
                         "../shared/data/cifar10-dev)")
    ap.add_argument("--only", default=None,
                    choices=("dev", "full", "long", "full-long", "short", "cnn"),
                    help="one measurement (default: dev and full)")
    ap.add_argument("--with-long", action="store_true", help="also --recipe long on dev")
    ap.add_argument("--cnn-epochs", type=int, default=10, help="epochs for cifar-cnn")
    args = ap.parse_args()
    if not (args.data / "cifar-10-batches-bin" / "data_batch_1.bin").is_file():
        raise SystemExit(f"{args.data} holds no cifar-10-batches-bin/data_batch_1.bin "
                         "(see --data)")
    WORK.mkdir(parents=True, exist_ok=True)
    todo = [args.only] if args.only else ["dev", "full"] + (["long"] if args.with_long else [])
    results = {}
    if {"dev", "long", "short", "cnn"} & set(todo):
        dev = dev_split_root(args.data)
    if "dev" in todo:
        results["dev"] = run("dev", [], dev)
    if "full" in todo:
        results["full"] = run("full-standin", [], standin_root(args.data), via_env=True)
        results["full"]["note"] = ("50k stand-in: time only (its test images are training "
                                   "images, so test_acc means nothing)")
    if "full-long" in todo:
        results["full-long"] = run("full-long-standin", ["--recipe", "long"],
                                   standin_root(args.data), via_env=True)
        results["full-long"]["note"] = ("50k stand-in: time only (its test images are "
                                        "training images, so test_acc means nothing)")
    if "short" in todo:
        results["short"] = run("short", ["--recipe", "short"], dev)
    if "long" in todo:
        results["long"] = run("long", ["--recipe", "long"], dev)
    if "cnn" in todo:
        results["cifar-cnn"] = run("cifar-cnn", [*WORKSHOP, "--epochs", str(args.cnn_epochs)],
                                   dev)
    path = WORK.parent / "results" / "cifar10.json"
    previous = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    kept = ("dev", "full", "long", "full-long", "short", "cifar-cnn")
    previous = {k: v for k, v in previous.items() if k in kept}
    write_result("cifar10", {"data": str(args.data), "runs": {**previous, **results},
                             "note": "dev: 8,000 train / 2,000 held out of cifar10-dev; "
                                     "full: 50k stand-in, wall time only"})


if __name__ == "__main__":
    main()
