"""CIFAR-10: the workshop's `cifar-cnn` trained the workshop's way, and `imgrec train cifar10`
(the default recipe, res-cnn), each timed as a whole process on the same data.

    .venv/bin/python benchmarks/cifar10.py [--cnn-epochs 10] [--recipe-epochs N] [--only recipe]

Data: ../shared/data/cifar10-dev (10,000 real training images, data_batch_1.bin only; it is
not a test set), or --data DIR holding cifar-10-batches-bin/. A temporary --data-dir root links
it as `cifar10/`; with no test_batch.bin imgrec holds out 10% of the images (stratified, seed 0)
as the test split, and the accuracies below are on those 1,000 held-out images.

The workshop net gets the Keras cifar10_cnn example's settings (RMSprop lr 1e-4, batch 32,
shifts of 0.1 and horizontal flips, no label smoothing, no weight decay; imgrec's one-cycle
schedule peaks at that lr), with --cnn-epochs instead of the example's 100 so it fits in
minutes. The default recipe runs as a user types it; --recipe-epochs shortens it.
Results: benchmarks/results/cifar10.json
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from common import IMGREC, ROOT, WORK, clean, timed, write_result

DEV = ROOT.parent / "shared" / "data" / "cifar10-dev"
WORKSHOP = ["--model", "cifar-cnn", "--optimizer", "rmsprop", "--lr", "1e-4", "--batch-size",
            "32", "--augment", "shift=0.1,flip", "--label-smoothing", "0", "--weight-decay", "0",
            "--tta", "none"]


def run(name: str, args: list[str], root: Path) -> dict:
    out = WORK / f"cifar10-{name}"
    clean(out)
    cmd = [*IMGREC, "train", "cifar10", "--data-dir", str(root), *args, "--out", str(out),
           "--json"]
    print(f"{name}: imgrec {' '.join(cmd[3:])}", flush=True)
    wall, stdout = timed(cmd)
    summary = json.loads(stdout)
    meta = json.loads((out / "imgrec.json").read_text())
    with (out / "history.csv").open() as f:
        epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
    t = meta["training"]
    result = {
        "command": "imgrec " + " ".join(["train", "cifar10", *args]),
        "model": meta["architecture"]["name"], "epochs": t["epochs"],
        "batch_size": t["batch_size"], "optimizer": t["optimizer"], "lr": t["lr"],
        "splits": t["splits"], "wall_s": round(wall, 1), "train_s": t["seconds"],
        "epoch_s": [round(s, 1) for s in epoch_s],
        "test_acc": summary["test"]["accuracy"], "test_n": summary["test"]["n"],
    }
    print(f"{name}: {result['model']}, {result['epochs']} epochs: held-out accuracy "
          f"{result['test_acc']:.4f} on {result['test_n']} images, {wall:.1f}s wall "
          f"({sum(epoch_s) / len(epoch_s):.1f}s per epoch)", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEV,
                    help="a folder holding cifar-10-batches-bin/ (default ../shared/data/"
                         "cifar10-dev)")
    ap.add_argument("--cnn-epochs", type=int, default=10, help="epochs for cifar-cnn")
    ap.add_argument("--recipe-epochs", type=int, default=None,
                    help="shorten the default recipe (default: the recipe's own)")
    ap.add_argument("--only", choices=("cnn", "recipe"), default=None)
    args = ap.parse_args()
    if not (args.data / "cifar-10-batches-bin").is_dir():
        raise SystemExit(f"{args.data} holds no cifar-10-batches-bin/ (see --data)")
    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        root = Path(tmp)
        (root / "cifar10").symlink_to(args.data.resolve(), target_is_directory=True)
        if args.only in (None, "cnn"):
            results["cifar-cnn"] = run(
                "cifar-cnn", [*WORKSHOP, "--epochs", str(args.cnn_epochs)], root)
        if args.only in (None, "recipe"):
            extra = ["--epochs", str(args.recipe_epochs)] if args.recipe_epochs else []
            results["recipe"] = run("recipe", extra, root)
    write_result("cifar10", {"data": str(args.data), "runs": results,
                             "note": "test_acc is on the held-out 10% of cifar10-dev "
                                     "(stratified, seed 0), not CIFAR-10's test batch"})


if __name__ == "__main__":
    main()
