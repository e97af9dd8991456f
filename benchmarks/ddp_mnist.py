"""Distributed data-parallel training (issue 13) against one process with the same global batch.

    .venv/bin/python benchmarks/ddp_mnist.py                  # mnist, features, finetune
    .venv/bin/python benchmarks/ddp_mnist.py --only mnist

mnist: `torchrun --nproc-per-node 2 -m imgrec train mnist --epochs 2 --batch-size 64` (gloo,
one thread per process: torchrun's OMP_NUM_THREADS=1) against `imgrec train mnist --epochs 2
--batch-size 128` (one process, all cores); test accuracy of each bundle (the training's own
figure on the 10,000 test digits) and the wall time of each whole command.
features / finetune: the same on ../shared/data/cats-dogs-mini with efficientnet_lite0
(features: default head epochs, batch 128 per process against 256; finetune: 2 epochs, batch 16
per process against 32), each with its own empty feature cache so both extract; accuracy of
each bundle by `imgrec evaluate` on the 100 validation photos (no test split there: one photo
is 1 point, so "within 0.3 points" means the same number of photos right).
Targets (issue 13): accuracy within 0.3 points of the single-process run.
Results: benchmarks/results/ddp_mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from common import IMGREC, ROOT, WORK, clean, mnist_dir, timed, write_result

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "imgrec"]
CATS_DOGS = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
CASES = {
    "mnist": (["mnist", "--epochs", "2"], "--batch-size", 64),
    "features": ([str(CATS_DOGS), "--model", "efficientnet_lite0", "--mode", "features"],
                 "--batch-size", 128),
    "finetune": ([str(CATS_DOGS), "--model", "efficientnet_lite0", "--mode", "finetune",
                  "--epochs", "2"], "--batch-size", 16),
}


def run(case: str, distributed: bool) -> dict:
    """One training command, timed whole; its bundle's accuracy."""
    args, flag, per_process = CASES[case]
    out = WORK / f"ddp-{case}-{'2x' if distributed else '1x'}"
    clean(out)
    batch = per_process if distributed else 2 * per_process
    cmd = [*(TORCHRUN if distributed else IMGREC), "train", *args, flag, str(batch),
           "--out", str(out), "--json", "--no-tensorboard"]
    env = {"IMGREC_DATA": str(mnist_dir().parent)}
    with tempfile.TemporaryDirectory() as cache:  # each run extracts its own features
        env["IMGREC_CACHE"] = cache
        wall, stdout = timed(cmd, env=env)
    summary = json.loads(stdout[stdout.index("{"):])
    acc = (summary["test"] or {}).get("accuracy")
    source = "test split (training's figure)"
    if acc is None:
        acc, source = evaluate(out)
    return {"command": " ".join(cmd[2:] if not distributed else ["torchrun", *cmd[3:]]),
            "wall_s": round(wall, 1), "accuracy": acc, "accuracy_on": source,
            "train_seconds": summary["seconds"], "epochs_run": summary["epochs_run"]}


def evaluate(bundle) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        timed([*IMGREC, "evaluate", str(bundle), str(CATS_DOGS), "--split", "val",
               "--json", metrics, "--out", tmp])
        with open(metrics) as f:
            m = json.load(f)
    return m["accuracy"], f"validation photos by imgrec evaluate ({m.get('n')} images)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(CASES), action="append")
    cases = ap.parse_args().only or list(CASES)
    load = os.getloadavg()
    results = {}
    for case in cases:
        if case != "mnist" and not (CATS_DOGS / "train").is_dir():
            print(f"{case}: skipped ({CATS_DOGS} is absent)")
            continue
        single, ddp = run(case, False), run(case, True)
        gap = abs(single["accuracy"] - ddp["accuracy"]) * 100
        results[case] = {"single": single, "ddp_2_processes": ddp,
                         "accuracy_gap_points": round(gap, 3), "pass": gap <= 0.3}
        print(f"{case}: 1 process {single['accuracy']:.4f} in {single['wall_s']:.1f}s; "
              f"2 processes {ddp['accuracy']:.4f} in {ddp['wall_s']:.1f}s; gap {gap:.2f} "
              f"points (target <= 0.3)")
    write_result("ddp_mnist", {**results, "load_before": [round(x, 2) for x in load],
                               "load_after": [round(x, 2) for x in os.getloadavg()]})


if __name__ == "__main__":
    main()
