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
kill: `imgrec train mnist --nproc 2 --batch-size 64 --epochs 3`; once epoch 1's checkpoint is
written and epoch 2 has run a few seconds, rank 1 gets SIGKILL; the seconds until the whole
command has ended and its message, then the same command with --resume, to the end.
Targets (issue 13): accuracy within 0.3 points of the single-process run; a killed rank ends
the job within 60 s with a clear message, and --resume completes.
Results: benchmarks/results/ddp_mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import IMGREC, RESULTS, ROOT, WORK, clean, mnist_dir, timed, write_result

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
    return {"command": " ".join(["torchrun" if distributed else "imgrec", *cmd[3:]]),
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


def rank_pids(root: int) -> dict[int, int]:
    """torchrun's workers below a process: rank -> pid (read from /proc)."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            todo += [int(c) for c in
                     Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks and b"imgrec" in cmd:
            found[int(ranks[0])] = pid
    return found


def kill_and_resume(into_epoch_s: float = 5.0) -> dict:
    """SIGKILL rank 1 during epoch 2; how long until the job ends, what it says; --resume."""
    out = WORK / "ddp-kill"
    clean(out)
    cmd = [*IMGREC, "train", "mnist", "--nproc", "2", "--batch-size", "64", "--epochs", "3",
           "--out", str(out), "--no-tensorboard"]
    env = {**os.environ, "IMGREC_DATA": str(mnist_dir().parent)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    while not (out / "checkpoint.pt").exists():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.2)
    time.sleep(into_epoch_s)
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=300)
    ended = time.perf_counter() - t0
    lines = [ln for ln in err.splitlines() if ln.startswith("imgrec:")]
    wall, stdout = timed([*cmd, "--resume", "--json"], env={"IMGREC_DATA": env["IMGREC_DATA"]})
    summary = json.loads(stdout[stdout.index("{"):])
    result = {"command": " ".join(["imgrec", *cmd[3:]]),
              "killed": "rank 1 (SIGKILL), epoch 2 running",
              "seconds_to_end": round(ended, 2), "exit_status": proc.returncode,
              "messages": lines, "resume_wall_s": round(wall, 1),
              "resume_epochs_run": summary["epochs_run"],
              "resume_test_accuracy": summary["test"]["accuracy"],
              "pass": ended <= 60 and len(lines) == 1 and summary["epochs_run"] == 3}
    print(f"kill: the job ended {ended:.1f}s after SIGKILL of rank 1 (exit "
          f"{proc.returncode}): {' | '.join(lines)}; --resume ran to epoch "
          f"{summary['epochs_run']} in {wall:.1f}s, test accuracy "
          f"{summary['test']['accuracy']:.4f}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=[*CASES, "kill"], action="append")
    cases = ap.parse_args().only or [*CASES, "kill"]
    load = os.getloadavg()
    previous = RESULTS / "ddp_mnist.json"  # a partial rerun (--only) keeps the other figures
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results.pop("machine", None)
    for case in cases:
        if case == "kill":
            results["kill"] = kill_and_resume()
            continue
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
