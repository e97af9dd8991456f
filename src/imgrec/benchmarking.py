"""`imgrec benchmark MODEL`: how fast a bundle's network runs on this machine, per engine
(PyTorch eager, ONNX Runtime float32, ONNX Runtime int8) and batch size, as a table, a JSON
file and a bar chart.

What is timed is the engine's forward pass on a batch of real photos already through the
bundle's contract (decoding and preprocessing are the same for every engine, so they would only
blur the comparison). Each (engine, batch) pair is warmed up once, then called repeatedly for
`seconds`; every call's wall time is kept, so p50/p99 are per-batch latencies and images/s is
images over the summed time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import BundleError, InputError

ENGINES = ("torch", "onnx", "int8")
ENGINE_LABELS = {"torch": "PyTorch eager", "onnx": "ONNX Runtime fp32",
                 "int8": "ONNX Runtime int8"}
DEFAULT_BATCH_SIZES = (1, 8, 32)
RESULT_FILE = "benchmark.json"
CHART_FILE = "benchmark.png"


@dataclass
class Measurement:
    """One engine at one batch size."""

    engine: str
    batch_size: int
    calls: int
    images_per_s: float
    p50_ms: float  # per batch
    p99_ms: float


@dataclass
class BenchmarkResult:
    model: str
    input_shape: list[int]
    threads: int
    seconds: float
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # engines skipped, and why
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "measurements": [asdict(m) for m in self.measurements]}

    def table(self) -> str:
        """The figures as a fixed-width text table."""
        lines = [f"{'engine':<20} {'batch':>5} {'images/s':>10} {'p50 ms':>9} {'p99 ms':>9}"]
        for m in self.measurements:
            lines.append(f"{ENGINE_LABELS[m.engine]:<20} {m.batch_size:>5} "
                         f"{m.images_per_s:>10.1f} {m.p50_ms:>9.2f} {m.p99_ms:>9.2f}")
        return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Enough to tell two machines' figures apart."""
    import onnxruntime as ort

    info = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": _cpu_model(), "python": platform.python_version(),
            "onnxruntime": ort.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_engines(bundle: Bundle, engines: tuple[str, ...] = ENGINES,
                  threads: int | None = None) -> tuple[dict[str, Callable], list[str]]:
    """The engines that can run here, and a note for each that cannot (no torch, no ONNX or
    int8 file)."""
    from .predict import make_engine

    built: dict[str, Callable] = {}
    notes: list[str] = []
    for name in engines:
        try:  # predict's one engine factory: "torch", "onnx" or "int8", on the CPU
            built[name] = make_engine(bundle, name, "cpu", threads)
        except ModuleNotFoundError as e:
            notes.append(f"{ENGINE_LABELS[name]} skipped: {e.name} is not installed")
        except (InputError, BundleError) as e:  # no int8 file; no weights for PyTorch
            notes.append(f"{ENGINE_LABELS[name]} skipped: {e.message}"
                         + (f" ({e.hint})" if e.hint else ""))
    return built, notes


def photo_batch(bundle: Bundle, size: int) -> np.ndarray:
    """`size` real photos through the bundle's contract and normalisation (float32 NCHW),
    the shipped samples and their mirrors repeated."""
    from .contract import load_input
    from .predict import sample_photos

    pixels = np.stack([load_input(p, bundle.preprocess) for p in sample_photos()])
    pixels = np.concatenate([pixels, pixels[..., ::-1]])
    pixels = np.resize(pixels, (size, *pixels.shape[1:]))
    return np.ascontiguousarray(bundle.preprocess.normalize(pixels), dtype=np.float32)


def time_engine(engine: Callable, x: np.ndarray, seconds: float,
                min_calls: int = 3) -> tuple[int, float, float, float]:
    """(calls, images/s, p50 ms, p99 ms) of `engine(x)`, after one warm-up call."""
    engine(x)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return (len(times), len(x) * len(times) / float(np.sum(times)),
            float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


#: the largest batch timed: one batch of 224 px colour images this size is ~2.5 GB of input
#: alone, and the engines' activations are many times that (100,000 ran out of memory)
MAX_BATCH_SIZE = 4096


def run_benchmark(model: str | Path | None, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                  seconds: float = 3.0, engines: tuple[str, ...] = ENGINES,
                  threads: int | None = None) -> BenchmarkResult:
    """Time each available engine at each batch size on this machine."""
    from .zoo import open_bundle

    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BATCH_SIZE:
        raise InputError(f"batch sizes must be whole numbers from 1 to {MAX_BATCH_SIZE}, got "
                         f"{list(batch_sizes)}", "e.g. --batch-sizes 1,8,32")
    if seconds <= 0:
        raise InputError(f"--seconds must be above 0, got {seconds}")
    bundle = open_bundle(model, need_weights=False)
    busy = busy_note()
    built, notes = build_engines(bundle, engines, threads)
    if not built:
        raise InputError(f"{bundle.path}: no engine can run this bundle here ("
                         + "; ".join(notes) + ")")
    c = bundle.preprocess
    result = BenchmarkResult(bundle.name, [c.channels, c.input_size, c.input_size],
                             threads or (os.cpu_count() or 1), seconds, notes=notes,
                             machine=machine_info())
    for size in batch_sizes:
        x = photo_batch(bundle, size)
        for name, engine in built.items():
            calls, rate, p50, p99 = time_engine(engine, x, seconds)
            result.measurements.append(Measurement(name, size, calls, round(rate, 2),
                                                   round(p50, 3), round(p99, 3)))
    if busy:
        result.notes.append(busy)
    return result


#: a 1-minute load average above this share of the CPUs makes the figures a busy machine's
BUSY_LOAD = 0.75


def busy_note() -> str | None:
    """A note when other work was already running (its figures are lower and noisier: PyTorch's
    thread team stalls at every operator when a core is taken), else None."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this system
        return None
    if load <= BUSY_LOAD * cpus:
        return None
    return (f"the machine was busy (load average {load:.1f} on {cpus} CPUs) when the benchmark "
            "started: these figures are lower and noisier than a quiet machine's")


def default_out(bundle_path: Path) -> Path:
    """`benchmark-NAME` in the current folder: never inside the bundle (its files are
    checksummed, and a cached pretrained bundle is no place for reports)."""
    return Path.cwd() / f"benchmark-{bundle_path.name}"


def check_out(out: Path, bundle_path: Path) -> Path:
    """--out must not be the bundle or a folder inside it."""
    from .files import check_output_folder

    out = Path(out).expanduser()
    resolved, inside = out.resolve(), bundle_path.resolve()
    if resolved == inside or inside in resolved.parents:
        raise InputError(f"--out {out} is inside the bundle {bundle_path}",
                         "give --out a folder outside it")
    return check_output_folder(out)


def write_outputs(result: BenchmarkResult, out: Path) -> tuple[Path, Path | None]:
    """benchmark.json and benchmark.png (images/s per batch size, a bar per engine); no PNG
    where matplotlib is not installed (a serve-only install benchmarks ONNX Runtime too)."""
    import importlib.util

    from .bundle import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / RESULT_FILE
    atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        return json_path, None
    from .figures import drawing, save_figure

    plt = drawing()
    engines = list(dict.fromkeys(m.engine for m in result.measurements))
    sizes = list(dict.fromkeys(m.batch_size for m in result.measurements))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(engines))
    for k, name in enumerate(engines):
        rates = [next((m.images_per_s for m in result.measurements
                       if m.engine == name and m.batch_size == s), 0.0) for s in sizes]
        bars = ax.bar(np.arange(len(sizes)) + k * width, rates, width,
                      label=ENGINE_LABELS[name])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(engines) - 1) / 2,
                  [f"batch {s}" for s in sizes])
    top = max((m.images_per_s for m in result.measurements), default=1.0)
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.set_ylabel("images / s")
    ax.set_title(f"{result.model}: {result.threads} thread(s), "
                 f"{result.machine.get('cpu_count')} CPU(s)")
    ax.legend(loc="upper left", ncols=len(engines), fontsize=8)
    return json_path, save_figure(fig, out / CHART_FILE)
