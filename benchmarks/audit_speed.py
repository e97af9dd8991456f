"""The label audit (issue 14) as a user runs it, timed from outside as a whole process:

    imgrec doctor DIR --labels --json FINDINGS

on ../shared/data/cats-dogs-mini (600 photos), first with an empty feature cache (IMGREC_CACHE
in benchmarks/work/: no embeddings, no backbone ONNX export), then warm. Each run's figures:
wall seconds of the whole command (doctor's file checks included), the audit's own seconds
from the findings (embedding, cross-validation, total), and the CPU seconds the process used
(user + system: a fairer figure than wall time on a shared machine).

Then, from the warm cache, how well the audit finds flipped labels: for each seed, a symlinked
copy of the mini set with 5% of its training labels flipped at random; the share of the top-k
(k = flipped) that are flipped files, the share of flipped files flagged, and the share of the
clean set flagged.

--big adds a 4000-photo set (cold, then warm): 2000 / 1000 / 1000 photos symlinked from the
train / val / test splits of transfer_speed.py's set (built by that script into
benchmarks/work/; augmented copies of the mini set's photos, 300-500 px).

Targets (issue 14, 2 cores): 600 photos <= 30 s cold and <= 5 s warm; 4000 photos <= 90 s cold.
Writes benchmarks/results/audit_speed.json.

    .venv/bin/python benchmarks/audit_speed.py [--big] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from common import IMGREC, ROOT, WORK, clean, timed, write_result

SOURCE = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
BIG_SOURCE = WORK / "cats-dogs-4000-2000-2000"
BIG_COUNTS = {"train": 2000, "val": 1000, "test": 1000}
TARGETS = {"mini_cold_s": 30.0, "mini_warm_s": 5.0, "big_cold_s": 90.0}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def audit_run(data: Path, cache: Path, name: str) -> dict:
    """One whole `imgrec doctor DIR --labels --json` process with IMGREC_CACHE = cache."""
    findings = WORK / f"audit-{name.replace(' ', '-')}.json"
    findings.unlink(missing_ok=True)
    cpu = _cpu()
    wall, _ = timed(
        [*IMGREC, "doctor", str(data), "--labels", "--json", str(findings)],
        env={"IMGREC_CACHE": str(cache)},
        ok=(0, 1),  # 1: doctor found a problem in the data (its findings are still written)
    )
    cpu = _cpu() - cpu
    f = json.loads(findings.read_text())
    a = f["label_audit"]
    out = {
        "command_s": round(wall, 1),
        "command_cpu_s": round(cpu, 1),
        "audit_s": a["seconds"]["total"],
        "embed_s": a["seconds"]["embed"],
        "cross_validation_s": a["seconds"]["cross_validation"],
        "audit_cpu_s": a["seconds"].get("cpu"),
        "images": a["images"],
        "features_computed": a["feature_cache"]["computed"],
        "features_cached": a["feature_cache"]["cached"],
        "counts": a["counts"],
        "cv_accuracy": a["cv_accuracy"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"{name:>10}: command {out['command_s']:.1f}s ({out['command_cpu_s']:.1f} CPU s), "
        f"audit {out['audit_s']:.1f}s (embed {out['embed_s']:.1f}s, cross-validation "
        f"{out['cross_validation_s']:.1f}s), {out['features_computed']} embeddings computed, "
        f"load {out['load_average_1m']}",
        flush=True,
    )
    return out


def symlink_tree(dest: Path, picks: dict[str, list[Path]], base: Path) -> Path:
    clean(dest)
    for files in picks.values():
        for p in files:
            q = dest / p.relative_to(base)
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p.resolve())
    return dest


def big_set() -> Path | None:
    """2000 / 1000 / 1000 photos of transfer_speed.py's set, each class in proportion."""
    if not (BIG_SOURCE / "train").is_dir():
        print(
            f"{BIG_SOURCE} is absent: run benchmarks/transfer_speed.py once to build it", flush=True
        )
        return None
    picks = {}
    for split, n in BIG_COUNTS.items():
        for cls in ("cat", "dog"):
            files = sorted((BIG_SOURCE / split / cls).glob("*.jpg"))
            picks[f"{split}/{cls}"] = files[: n // 2]
    return symlink_tree(WORK / "audit-4000", picks, BIG_SOURCE)


def flip_detection(seeds: int, cache: Path) -> dict:
    """Flipped-label detection over seeds, in this process, from the warm cache."""
    os.environ["IMGREC_CACHE"] = str(cache)
    from imgrec import audit

    picks = {"all": sorted(SOURCE.rglob("*.jpg"))}
    clean_set = symlink_tree(WORK / "audit-flip", picks, SOURCE)
    flagged_clean = len(audit(clean_set).flagged("label_issue"))
    runs = []
    for seed in range(seeds):
        data = symlink_tree(WORK / "audit-flip", picks, SOURCE)
        train = sorted((data / "train").glob("*/*.jpg"))
        chosen = np.random.default_rng(seed).choice(
            len(train), round(0.05 * len(train)), replace=False
        )
        flipped = set()
        for i in sorted(chosen.tolist()):
            p = train[i]
            q = p.parent.parent / ("dog" if p.parent.name == "cat" else "cat") / p.name
            p.rename(q)
            flipped.add(str(q.relative_to(data)))
        ranked = audit(data).flagged("label_issue")
        runs.append(
            {
                "seed": seed,
                "flipped": len(flipped),
                "top_k_precision": len(flipped & set(ranked[: len(flipped)])) / len(flipped),
                "recall": len(flipped & set(ranked)) / len(flipped),
                "flagged": len(ranked),
            }
        )
        print(
            f"  seed {seed}: top-k precision {runs[-1]['top_k_precision']:.2f}, flipped "
            f"flagged {runs[-1]['recall']:.2f}, {len(ranked)} flagged",
            flush=True,
        )
    clean(WORK / "audit-flip")
    return {
        "clean_flagged": flagged_clean,
        "clean_flagged_share": round(flagged_clean / 600, 4),
        "runs": runs,
        "min_top_k_precision": min(r["top_k_precision"] for r in runs),
        "min_recall": min(r["recall"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also the 4000-photo set")
    ap.add_argument("--seeds", type=int, default=5, help="flip-detection seeds (0: skip)")
    args = ap.parse_args()
    if not (SOURCE / "train").is_dir():
        sys.exit(f"{SOURCE} is absent")
    cache = WORK / "audit-cache"
    clean(cache)  # cold: no embeddings, no exported backbone
    result = {
        "benchmark": "audit_speed",
        "command": "imgrec doctor DIR --labels --json FINDINGS",
        "mini": {"data": "../shared/data/cats-dogs-mini"},
        "targets": TARGETS,
    }
    result["mini"]["cold"] = audit_run(SOURCE, cache, "mini cold")
    result["mini"]["warm"] = audit_run(SOURCE, cache, "mini warm")
    if args.seeds:
        result["flip_detection"] = flip_detection(args.seeds, cache)
    big = big_set() if args.big else None
    if big is not None:
        big_cache = WORK / "audit-cache-4000"
        clean(big_cache)
        result["big"] = {
            "data": str(big.relative_to(ROOT)),
            **BIG_COUNTS,
            "cold": audit_run(big, big_cache, "4000 cold"),
            "warm": audit_run(big, big_cache, "4000 warm"),
        }
        clean(big_cache)
    clean(cache)
    mini = result["mini"]
    result["meets_targets"] = {
        "mini_cold_s": mini["cold"]["command_s"] <= TARGETS["mini_cold_s"],
        "mini_warm_s": mini["warm"]["command_s"] <= TARGETS["mini_warm_s"],
        **(
            {"big_cold_s": result["big"]["cold"]["command_s"] <= TARGETS["big_cold_s"]}
            if "big" in result
            else {}
        ),
    }
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_result("audit_speed", result)


if __name__ == "__main__":
    main()
