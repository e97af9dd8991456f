"""`imgrec predict --out` at scale (issue 13, acceptance items 3 and 4), with the offline
`imagenet` model (EfficientNet-Lite0) on real photos.

1. Inputs: N (default 20 000) files under benchmarks/work/predict-scale/inputs/, symlinks to
   the cats-dogs-mini photos in folders of 600 (git-ignored; the photos are not copied).
2. Reference: `imgrec benchmark imagenet --batch-sizes 32`, the ONNX engine's batch-32 images/s.
3. `imgrec predict INPUTS --model imagenet --out results.parquet`: RSS (VmRSS from /proc)
   sampled while it runs; the RSS when the first 1000 files are committed against the RSS at
   the end (target < 1.5x); throughput (the run's own images/s, model loading excluded) against
   the reference (target: within 15%, a ratio >= 0.85). On a shared machine the wall-clock
   ratio says little, so images per CPU-second are compared too (the reference's from the
   same engine at batch 32 timed with its process CPU time).
4. The same run into another output, killed with SIGKILL partway (at a random instant past
   --kill-after rows), then `--resume`: exactly N rows, every input once, in input order,
   labels equal to the uninterrupted run's.
5. `--ray` (a local Ray) against the single-process run on the first --ray-files (2 000)
   inputs: top-1 label agreement and the largest probability difference (target: all equal,
   <= 1e-5).

Prints each figure and writes benchmarks/results/predict_scale.json.

    python benchmarks/predict_scale.py                      # the measurement (~6 min quiet)
    python benchmarks/predict_scale.py --files 3000 --ray-files 300 --kill-after 1200  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMGREC, RESULTS, ROOT, WORK, clean, timed, write_result  # noqa: E402

MINI = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
BASE = WORK / "predict-scale"


def make_inputs(n: int, folder: Path) -> Path:
    """n symlinks to the mini set's photos, 600 to a folder (copy-000/, copy-001/, ...)."""
    photos = sorted(p for p in MINI.rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"{MINI} is absent: the photos come from ../shared")
    marker = folder / f".made-{n}"
    if marker.exists():
        return folder
    clean(folder)
    for i in range(n):
        sub = folder / f"copy-{i // len(photos):03d}"
        sub.mkdir(parents=True, exist_ok=True)
        src = photos[i % len(photos)]
        (sub / f"{src.parent.name}-{src.name}").symlink_to(src)
    marker.touch()
    return folder


def reference_images_per_s(seconds: float) -> float:
    out = BASE / "benchmark"
    _, text = timed([*IMGREC, "benchmark", "imagenet", "--batch-sizes", "32", "--seconds",
                     str(seconds), "--out", str(out)])
    print(text)
    data = json.loads((out / "benchmark.json").read_text())
    (row,) = [m for m in data["measurements"] if m["engine"] == "onnx" and m["batch_size"] == 32]
    return row["images_per_s"]


_REFERENCE_CPU = '''
import json, sys, time
from imgrec.benchmarking import build_engines, photo_batch
from imgrec.zoo import open_bundle
bundle = open_bundle("imagenet", need_weights=False)
engine = build_engines(bundle, ("onnx",), None)[0]["onnx"]
x = photo_batch(bundle, 32)
engine(x)
cpu, wall, images = time.process_time(), time.perf_counter(), 0
while time.perf_counter() - wall < float(sys.argv[1]):
    engine(x)
    images += len(x)
print(json.dumps({"images": images, "cpu_s": time.process_time() - cpu,
                  "wall_s": time.perf_counter() - wall}))
'''


def reference_cpu(seconds: float) -> dict:
    """The same ONNX engine at batch 32 (imgrec benchmark's), with the CPU seconds it used:
    images per CPU-second compare fairly even when other work shares the cores."""
    _, text = timed([sys.executable, "-c", _REFERENCE_CPU, str(seconds)])
    r = json.loads(text)
    return {**r, "images_per_cpu_s": round(r["images"] / r["cpu_s"], 2),
            "images_per_s": round(r["images"] / r["wall_s"], 2)}


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def progress(out: Path) -> tuple[int, bool]:
    """(rows committed, complete) from the output's progress record."""
    try:
        state = json.loads((out / "_progress.json").read_text())
    except (OSError, ValueError):
        return 0, False
    return state.get("rows", 0), bool(state.get("complete"))


def watched_run(inputs: Path, out: Path, kill_after: int | None = None) -> dict:
    """`imgrec predict --out` in a child; RSS samples keyed by committed rows; SIGKILL at a
    random instant once `kill_after` rows are committed (when given)."""
    cmd = [*IMGREC, "predict", str(inputs), "--model", "imagenet", "--out", str(out), "--json"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int, float]] = []  # (rows committed, RSS KiB, CPU s)
    kill_at = None
    while child.poll() is None:
        (rows, complete), rss, cpu = progress(out), rss_kib(child.pid), cpu_seconds(child.pid)
        if rss is not None and cpu is not None and not complete:  # not the teardown
            samples.append((rows, rss, cpu))
        if kill_after is not None and rows >= kill_after:
            kill_at = kill_at or time.monotonic() + random.uniform(0.0, 2.0)
            if time.monotonic() >= kill_at:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                return {"killed_at_rows": progress(out)[0], "samples": samples}
        time.sleep(0.1)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return {"summary": json.loads(stdout), "samples": samples}


def cpu_figures(samples: list[tuple[int, int, float]]) -> dict:
    """Images per CPU-second of the run from its first 1000 committed rows to its last."""
    first = next(s for s in samples if s[0] >= 1000)
    last = samples[-1]
    return {"images_per_cpu_s": round((last[0] - first[0]) / (last[2] - first[2]), 2),
            "cpu_window_rows": last[0] - first[0]}


def rss_figures(samples: list[tuple[int, int, float]]) -> dict:
    """RSS when the first 1000 files are committed, at the end (the most while the last
    chunk was scored: after it the lanes are freed and RSS falls, which would flatter the
    figure) and the most after the first 1000, in MiB; per 1000 rows the most seen."""
    first = next(rss for rows, rss, _ in samples if rows >= 1000)
    later = [rss for rows, rss, _ in samples if rows >= 1000]
    end = max(rss for rows, rss, _ in samples if rows == samples[-1][0])
    curve: dict[int, int] = {}
    for rows, rss, _ in samples:
        curve[rows // 1000 * 1000] = max(curve.get(rows // 1000 * 1000, 0), rss)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"rss_after_1000_mib": mib(first), "rss_end_mib": mib(end),
            "rss_max_after_1000_mib": mib(max(later)),
            "rss_end_over_1000": round(end / first, 3),
            "rss_max_over_1000": round(max(later) / first, 3),
            "rss_mib_by_thousand_rows": {k: mib(v) for k, v in sorted(curve.items())}}


def read_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


def check_resumed(inputs: Path, out: Path, full: list[dict]) -> dict:
    from imgrec.predict import expand_inputs

    rows = read_rows(out)
    names = [r["input"] for r in rows]
    expected = list(expand_inputs([str(inputs)]))
    return {"rows": len(rows), "unique_inputs": len(set(names)),
            "in_input_order": names == expected,
            "labels_equal_uninterrupted": [r["label"] for r in rows] == [r["label"] for r in full]}


def ray_vs_local(inputs: Path, n: int) -> dict:
    """The first n inputs in their own folder, scored locally and on a local Ray."""
    from imgrec.predict import expand_inputs

    subset = BASE / f"ray-inputs-{n}"
    if not (subset / ".made").exists():
        clean(subset)
        subset.mkdir(parents=True)
        for i, src in enumerate(expand_inputs([str(inputs)])):
            if i == n:
                break
            (subset / f"{i:07d}-{Path(src).name}").symlink_to(Path(src).resolve())
        (subset / ".made").touch()
    result = {}
    for name, extra in (("local", []), ("ray", ["--ray"])):
        out = BASE / f"ray-check-{name}.parquet"
        wall, text = timed([*IMGREC, "predict", str(subset), "--model", "imagenet", "--out",
                            str(out), "--overwrite", "--json", *extra])
        result[f"{name}_wall_s"] = round(wall, 1)
        result[f"{name}_images_per_s"] = json.loads(text)["images_per_s"]
    a = read_rows(BASE / "ray-check-local.parquet")
    b = read_rows(BASE / "ray-check-ray.parquet")
    same_order = [r["input"] for r in a] == [r["input"] for r in b]
    diffs = [abs(x["probability"] - y["probability"]) for x, y in zip(a, b, strict=True)
             if x["probability"] is not None]
    topk = [abs(p["probability"] - q["probability"]) for x, y in zip(a, b, strict=True)
            if x["top_k"] for p, q in zip(json.loads(x["top_k"]), json.loads(y["top_k"]),
                                          strict=True)]
    agree = sum(x["label"] == y["label"] for x, y in zip(a, b, strict=True))
    return {**result, "files": n, "same_order": same_order, "top1_agreement": agree / len(a),
            "max_abs_top1_prob_diff": max(diffs), "max_abs_topk_prob_diff": max(topk)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--ray-files", type=int, default=2_000)
    ap.add_argument("--kill-after", type=int, default=8_000, help="rows before the kill -9")
    ap.add_argument("--bench-seconds", type=float, default=10.0)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--ray-only", action="store_true", help="only the --ray check, merged "
                    "into an earlier predict_scale.json")
    args = ap.parse_args()
    inputs = make_inputs(args.files, BASE / f"inputs-{args.files}")
    if args.ray_only:
        return ray_stage(inputs, args.ray_files)
    load = os.getloadavg()[0]
    reference = reference_images_per_s(args.bench_seconds)
    print(f"reference: imgrec benchmark imagenet, onnx batch 32: {reference:.1f} images/s")
    ref_cpu = reference_cpu(args.bench_seconds)
    print(f"reference CPU: {ref_cpu['images_per_cpu_s']:.1f} images per CPU-second")

    full_out = BASE / "results.parquet"
    clean(full_out)
    run = watched_run(inputs, full_out)
    summary = run["summary"]
    rss = rss_figures(run["samples"])
    ratio = summary["images_per_s"] / reference
    cpu = cpu_figures(run["samples"])
    cpu["cpu_ratio_to_reference"] = round(cpu["images_per_cpu_s"] / ref_cpu["images_per_cpu_s"],
                                          3)
    print(f"predict --out: {cpu['images_per_cpu_s']:.1f} images per CPU-second "
          f"({cpu['cpu_ratio_to_reference']:.3f} of the reference's)")
    print(f"predict --out: {summary['rows']} rows, {summary['images_per_s']:.1f} images/s "
          f"({ratio:.3f} of the reference); RSS {rss['rss_after_1000_mib']} MiB after 1000, "
          f"{rss['rss_end_mib']} MiB at the end ({rss['rss_end_over_1000']}x), at most "
          f"{rss['rss_max_after_1000_mib']} MiB ({rss['rss_max_over_1000']}x)")
    full = read_rows(full_out)

    killed_out = BASE / "killed.parquet"
    clean(killed_out)
    killed = watched_run(inputs, killed_out, kill_after=args.kill_after)
    wall, text = timed([*IMGREC, "predict", str(inputs), "--model", "imagenet", "--out",
                        str(killed_out), "--resume", "--json"])
    resumed = {"killed_at_rows": killed["killed_at_rows"], **json.loads(text),
               **check_resumed(inputs, killed_out, full)}
    print(f"kill -9 at {resumed['killed_at_rows']} committed rows, --resume: {resumed['rows']} "
          f"rows, {resumed['unique_inputs']} unique, in order {resumed['in_input_order']}, "
          f"labels equal {resumed['labels_equal_uninterrupted']}")

    result = {
        "files": args.files, "load_average_at_start": round(load, 2),
        "reference_onnx_batch32_images_per_s": reference,
        "reference_cpu": ref_cpu, "load_average_after": round(os.getloadavg()[0], 2),
        "predict": {**summary, **rss, **cpu, "ratio_to_reference": round(ratio, 3)},
        "targets": {"rss_end_over_1000": "< 1.5", "rss_max_over_1000": "< 1.5",
                    "ratio_to_reference": ">= 0.85",
                    "resume": "N rows, unique, in order", "ray": "labels equal, <= 1e-5"},
        "resume": resumed, "ray_vs_local": None}
    write_result("predict_scale", result)  # kept even if the Ray stage fails
    if not args.skip_ray:
        ray_stage(inputs, args.ray_files)


def ray_stage(inputs: Path, files: int) -> None:
    """--ray against local, merged into predict_scale.json (alone: --ray-only)."""
    ray = ray_vs_local(inputs, files)
    print(f"--ray vs local on {ray['files']} files: top-1 agreement "
          f"{ray['top1_agreement']:.4%}, max |p diff| {ray['max_abs_topk_prob_diff']:.2e}")
    path = RESULTS / "predict_scale.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.pop("machine", None)
    write_result("predict_scale", {**result, "ray_vs_local": ray})


if __name__ == "__main__":
    main()
