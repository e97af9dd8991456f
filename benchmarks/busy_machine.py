"""`imgrec train mnist --epochs 1` on a machine that is not quiet: one busy-looping process
beside it (a browser tab, a compile, another job), with imgrec's thread governor (the default)
and with the threads pinned to every core (IMGREC_THREADS), then on the quiet machine.
Whole processes, side by side in one sitting.

    .venv/bin/python benchmarks/busy_machine.py [--rounds 2]

Results: benchmarks/results/busy_machine.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import IMGREC, WORK, clean, mnist_dir, timed, write_result

HOG = [sys.executable, "-c", "while True: pass"]


def train(env: dict[str, str]) -> tuple[float, float]:
    out = WORK / "busy-mnist"
    clean(out)
    wall, stdout = timed(
        [
            *IMGREC,
            "train",
            "mnist",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--json",
            "--no-tensorboard",
        ],
        env,
    )
    return wall, json.loads(stdout)["test"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = {"IMGREC_DATA": str(mnist_dir().parent)}
    cases = {
        "busy, governor": ({}, True),
        "busy, pinned to all cores": ({"IMGREC_THREADS": str(os.cpu_count() or 1)}, True),
        "quiet": ({}, False),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, (env, busy) in cases.items():
            hog = subprocess.Popen(HOG) if busy else None
            try:
                wall, acc = train({**base, **env})
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            runs[name].append(round(wall, 1))
            print(f"round {r + 1}: {name:28s} {wall:6.1f}s  test accuracy {acc:.4f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    gain = med["busy, pinned to all cores"] / med["busy, governor"]
    print(
        "median wall: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in med.items())
        + f"; the governor is {gain:.2f}x faster on the busy machine"
    )
    write_result(
        "busy_machine",
        {
            "command": "imgrec train mnist --epochs 1",
            "runs": runs,
            "median_wall_s": med,
            "governor_speedup": round(gain, 2),
        },
    )


if __name__ == "__main__":
    main()
