"""`imgrec predict ... --out results.parquet --ray [ADDRESS]`: the batch job on Ray Data.

Why Ray Data and not a scheduler of our own: it already places actors on a cluster's nodes,
streams blocks between them with backpressure and retries lost workers. The job is the same as
`batch_predict.run_batch` (same sorted inputs, same output writer and committed chunks, so the
output is byte-for-byte the same format and `--resume` works across local and Ray runs); only
the scoring moves to Ray: the file names, in windows of WINDOW, go through `from_items` ->
`map_batches` with `OnnxActor` (a stateful class: each actor loads the bundle once and runs a
single-threaded ONNX Runtime session on its CPU, decoding with the one decoder,
`contract.load_input`) -> results iterated back in input order (`preserve_order`) and written
by the driver. On a real cluster the bundle and the input files must be at the same path on
every node (a shared filesystem). Ray is imported lazily: `imgrec --help` stays fast and an
install without `imgrec[cluster]` gets one line saying how to add it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .batch_predict import BATCH, BatchSummary, batched, predict_chunk, run_batch
from .errors import InputError
from .predict import Predictor, available_cores

#: file names per Ray dataset: the driver never holds more than this many names and results
WINDOW = 20_000


class OnnxActor:
    """The stateful map_batches class: one bundle and engine per actor, loaded once; one
    ONNX Runtime thread, as the actor holds one CPU (num_cpus=1)."""

    def __init__(self, bundle: str, engine: str, top_k: int, invert: str | None,
                 threads: int = 1):
        self.predictor = Predictor.load(bundle, engine=engine, threads=threads)
        self.top_k, self.invert = top_k, invert

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        sources = [str(s) for s in batch["input"]]
        records = predict_chunk(self.predictor, sources, self.top_k, self.invert)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def import_ray():
    """ray, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data], not just ray core)
    except ModuleNotFoundError as e:
        raise InputError(f"--ray needs Ray Data, which is not installed ({e.name})",
                         "pip install 'imgrec[cluster]'") from None
    return ray


def check_address(address: str) -> str | None:
    """--ray-address: "local" (none: start a local Ray), "auto", HOST:PORT or
    ray://HOST:PORT."""
    if address == "local":
        return None
    if address == "auto" or address.startswith("ray://") or ":" in address:
        return address
    raise InputError(f"--ray {address!r} is not a Ray address (auto, HOST:PORT, ray://HOST:PORT)",
                     "leave --ray-address out for a local Ray")


#: how long a cluster's address may take to accept a connection
REACH_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """HOST:PORT (or ray://HOST:PORT) accepts a connection, else one line now: ray.init
    retries an address nobody answers at for ever, logging a line every few seconds."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except ValueError:
        raise InputError(f"--ray {address}: {port!r} is not a port number",
                         "give HOST:PORT of the Ray head node") from None
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise InputError(f"--ray {address}: nothing answers there ({why})",
                         "check the address (`ray status` on the head node), or leave "
                         "--ray-address out for a local Ray") from None


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray on this process's cores (no
    dashboard, quiet). A Ray already initialised in this process is used as it is (tests
    share one). True when this call started it (so it shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing phones home
    quiet = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    logging.getLogger("ray").setLevel(logging.ERROR)  # its notes before init configures it
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=available_cores(), **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"--ray {address or 'local'}: cannot start or reach Ray ({e})",
                         "check the address (`ray status` on the head node)") from None
    return True


def _quiet_data(ray) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results in input order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def ray_scorer(address: str | None, actors: int | None = None):
    """A batch_predict scorer running the model in Ray actors (`actors` of them, default one
    per CPU of the cluster)."""

    def score(predictor: Predictor, sources: Iterator[str], top_k: int,
              invert: str | None) -> Iterator[dict]:
        ray = import_ray()
        started = connect(ray, address)
        try:
            _quiet_data(ray)
            n = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
            job = dict(bundle=str(Path(predictor.bundle.path).resolve()),
                       engine=_engine_name(predictor), top_k=top_k, invert=invert)
            pool = ray.data.ActorPoolStrategy(size=n)
            for window in batched(sources, WINDOW):
                ds = ray.data.from_items([{"input": s} for s in window])
                ds = ds.map_batches(OnnxActor, fn_constructor_kwargs=job, batch_size=BATCH,
                                    batch_format="numpy", compute=pool, num_cpus=1)
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    yield from (json.loads(r) for r in batch["record"])
        finally:
            if started:
                ray.shutdown()

    return score


def _engine_name(predictor: Predictor) -> str:
    """The engine the actors build: the one the driver resolved (onnx, int8 or torch)."""
    return getattr(predictor.engine, "name", "torch")


def run_ray(inputs: list[str] | None, out: str | Path, address: str = "local",
            actors: int | None = None, **options) -> BatchSummary:
    """run_batch with the scoring on Ray (see the module docstring)."""
    resolved = check_address(address)
    for item in inputs or []:
        if item.startswith("ray://"):
            raise InputError(f"{item} is a Ray address, not an input",
                             f"give it right after --ray, or as --ray-address {item}")
    import_ray()  # before any output is created: a missing Ray is one line, nothing written
    return run_batch(inputs, out, scorer=ray_scorer(resolved, actors), **options)
