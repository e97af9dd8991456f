"""`imgrec train fashion-mnist` (default recipe), timed as a whole process.
Target (issue 12): >= 93.5% test accuracy within 150 s on a 2-core machine.

    .venv/bin/python benchmarks/fashion_mnist.py

Data: $IMGREC_DATA/fashion-mnist or Debian's dataset-fashion-mnist package.
Results: benchmarks/results/fashion_mnist.json
"""

from __future__ import annotations

import json

from common import IMGREC, WORK, clean, timed, write_result


def main() -> None:
    out = WORK / "fashion-bundle"
    clean(out)
    wall, stdout = timed([*IMGREC, "train", "fashion-mnist", "--out", str(out), "--json"])
    acc = json.loads(stdout)["test"]["accuracy"]
    print(f"imgrec train fashion-mnist: {wall:.1f}s, test accuracy {acc:.4f} "
          f"(targets: <= 150 s, >= 0.935)")
    write_result("fashion_mnist", {"wall_s": round(wall, 1), "test_acc": acc,
                                   "pass": wall <= 150 and acc >= 0.935})


if __name__ == "__main__":
    main()
