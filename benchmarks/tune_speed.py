"""`imgrec tune` (issue 15), timed as whole processes.

cats-dogs: `imgrec tune ../shared/data/cats-dogs-mini --model efficientnet_lite0 --mode
features --trials 20` with a cold feature cache (IMGREC_CACHE in a new temporary folder: no
features, no backbone export), then `imgrec train` with the default features recipe on the
same data. Targets: 20 trials in <= 120 s on 2 cores, features extracted once (only trial 0
computes any, apart from augmented views a trial asks for first), and the best trial's
validation accuracy >= the default recipe's.

fashion: `imgrec tune fashion-mnist --subset 10000 --trials 12` (scratch, default space and
median pruner). Target: at least a third of the 12 trials pruned, read from the study.

Both print the load average before and after (the machine may be shared).

    .venv/bin/python benchmarks/tune_speed.py                 # both parts
    .venv/bin/python benchmarks/tune_speed.py --part fashion  # one part (merged into the JSON)

Results: benchmarks/results/tune_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import tempfile
from pathlib import Path

from common import IMGREC, RESULTS, ROOT, clean, timed, write_result

CATS_DOGS = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
TARGET_S, TRIALS = 120.0, 20


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def per_trial(out: Path, attr: str) -> list:
    """A user attribute of every trial, by trial number, read from the study's database."""
    with sqlite3.connect(out / "study.db") as con:
        rows = con.execute(
            "SELECT t.number, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
            "ON a.trial_id = t.trial_id AND a.key = ? ORDER BY t.number",
            (attr,),
        ).fetchall()
    return [None if v is None else json.loads(v) for _, v in rows]


def values(out: Path) -> list:
    """Each trial's value by trial number (a pruned trial's is the last one it reported;
    None for a failed one)."""
    with sqlite3.connect(out / "study.db") as con:
        rows = con.execute(
            "SELECT t.number, v.value FROM trials t LEFT JOIN trial_values v "
            "ON v.trial_id = t.trial_id ORDER BY t.number"
        ).fetchall()
    return [None if v is None else round(v, 4) for _, v in rows]


def cats_dogs(work: Path) -> dict:
    cache, out, recipe = work / "cache", work / "tune-cats-dogs", work / "recipe-cats-dogs"
    env = {"IMGREC_CACHE": str(cache)}
    before, cpu0 = load(), cpu_s()
    tune = f"tune {CATS_DOGS} --model efficientnet_lite0 --mode features --trials {TRIALS}"
    wall, stdout = timed(
        [*IMGREC, *tune.split(), "--out", str(out), "--sampler-seed", "0", "--json"], env=env
    )
    after, cpu = load(), round(cpu_s() - cpu0, 1)
    s = json.loads(stdout)
    computed = per_trial(out, "features_computed")
    train = f"train {CATS_DOGS} --model efficientnet_lite0 --mode features --json"
    _, train_out = timed([*IMGREC, *train.split(), "--out", str(recipe)], env=env)
    t = json.loads(train_out)
    best_epoch = json.loads((recipe / "imgrec.json").read_text())["training"]["best_epoch"]
    recipe_val = t["history"][best_epoch - 1]["val_acc"]
    r = {
        "wall_s": round(wall, 1),
        "cpu_s": cpu,
        "trials": s["trials"],
        "ran_here": s["ran_here"],
        "best_val_acc": s["best"]["value"],
        "best_params": s["best"]["params"],
        "best_trial": s["best"]["trial"],
        "recipe_trial_val_acc": (s["recipe"] or {}).get("value"),
        "default_recipe_val_acc": recipe_val,
        "features_computed_per_trial": computed,
        "value_per_trial": values(out),
        "test": s["test_note"],
        "load_before": before,
        "load_after": after,
    }
    r["pass"] = wall <= TARGET_S and r["best_val_acc"] >= recipe_val
    print(
        f"cats-dogs features: {TRIALS} trials in {wall:.1f}s (target <= {TARGET_S:g} s), "
        f"best val_acc {r['best_val_acc']:.4f} vs default recipe {recipe_val:.4f}; features "
        f"computed per trial {computed}; {cpu:.1f} CPU-s; load {before} -> {after}",
        flush=True,
    )
    return r


def fashion(work: Path) -> dict:
    out = work / "tune-fashion"
    before, cpu0 = load(), cpu_s()
    tune = "tune fashion-mnist --subset 10000 --trials 12 --sampler-seed 0 --json"
    wall, stdout = timed([*IMGREC, *tune.split(), "--out", str(out)])
    after, cpu = load(), round(cpu_s() - cpu0, 1)
    s = json.loads(stdout)
    pruned_at = per_trial(out, "pruned_at")
    r = {
        "wall_s": round(wall, 1),
        "cpu_s": cpu,
        "trials": s["trials"],
        "pruned": s["trials"]["pruned"],
        "pruned_at_epoch": pruned_at,
        "value_per_trial": values(out),
        "epochs_run": per_trial(out, "epochs_run"),
        "best_val_acc": s["best"]["value"],
        "best_params": s["best"]["params"],
        "recipe_trial_val_acc": (s["recipe"] or {}).get("value"),
        "test_acc": (s["test"] or {}).get("accuracy"),
        "load_before": before,
        "load_after": after,
    }
    r["pass"] = r["pruned"] >= 4
    print(
        f"fashion-mnist (10 000 training images): {r['pruned']} of 12 trials pruned "
        f"(target >= 4) at epochs {[e for e in pruned_at if e]}; best val_acc "
        f"{r['best_val_acc']:.4f}, final bundle test accuracy {r['test_acc']}; {wall:.1f}s, "
        f"{cpu:.1f} CPU-s; "
        f"load {before} -> {after}",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("cats-dogs", "fashion", "both"), default="both")
    args = ap.parse_args()
    path = RESULTS / "tune_speed.json"
    result = json.loads(path.read_text()) if path.is_file() and args.part != "both" else {}
    result.pop("machine", None)
    with tempfile.TemporaryDirectory(prefix="imgrec-tune-") as tmp:
        work = Path(tmp)
        if args.part in ("cats-dogs", "both"):
            result["cats_dogs_features"] = cats_dogs(work)
        if args.part in ("fashion", "both"):
            result["fashion_mnist_pruning"] = fashion(work)
        clean(work)
    write_result("tune_speed", result)


if __name__ == "__main__":
    main()
