"""Load test: `imgrec serve` (float32, then int8) against the workshop design
(benchmarks/flask_baseline.py), in one sitting, on loopback only, bounded in requests and time.

N concurrent clients (default 16) post a ~450 px JPEG (the bundled chelsea.jpg) as multipart
field `file` to each server in turn, all running the efficientnet_lite0 ImageNet model; we
report requests/s, p50, p99 and errors, each imgrec server's ready time (process start to the
first `GET /healthz` 200), write benchmarks/results/serve_load.json and print the ratios.
Flask runs once per --flask-torch-threads (PyTorch's own thread count, then 1): the baseline
is the faster of them. Targets: imgrec float32 >= 4x the baseline's requests/s with p99 no
worse and no errors; ready <= 4 s.

The load generator shares the machine's cores with the server, so it is lean and identical for
every server: one asyncio process, one socket per client, each request's bytes built once, the
answer's status line, headers and body read with Content-Length (a server that closes the
connection, as Flask's single-threaded HTTP/1.0 server does, gets a new one per request).

    python benchmarks/serve_load.py                  # 30 s per server (the measurement)
    python benchmarks/serve_load.py --duration 3     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
TARGET_RATIO, TARGET_READY_S = 4.0, 4.0
#: an answer not read by then counts as an error (a connection the server never answers, as
#: Flask's one-at-a-time server once left, must not hang the whole benchmark)
REQUEST_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def start(cmd: list[str], port: int, timeout: float = 180.0) -> tuple[subprocess.Popen, float]:
    """Start a server; (process, seconds from its start to the first /healthz 200)."""
    t0 = time.perf_counter()
    # The server's log goes to a file: a pipe nobody reads fills after ~800 request lines
    # (64 KiB) and then blocks the server (it stopped Flask's werkzeug mid-run).
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{log.read()[-3000:]}")
        if healthy(port):
            return proc, time.perf_counter() - t0
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"server did not start in {timeout:.0f}s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def multipart_request(path: str, port: int, image: bytes, name: str) -> bytes:
    """One POST with the image as multipart field `file`, as bytes ready to send."""
    boundary = "imgrecloadboundary7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep the connection open?)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    version, status = status_line.split(b" ", 2)[:2]
    length, keep = None, version == b"HTTP/1.1"
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.partition(b":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"connection":
            keep = value == b"keep-alive" or (keep and value != b"close")
    body = await (reader.readexactly(length) if length is not None else reader.read())
    return int(status), body, keep and length is not None


class Client:
    """One connection, reopened whenever the server closes it."""

    def __init__(self, port: int, request: bytes):
        self.port, self.request = port, request
        self.reader = self.writer = None

    async def post(self) -> tuple[float, str | None]:
        t = time.perf_counter()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(self.request)
            status, body, keep = await asyncio.wait_for(read_response(self.reader),
                                                        REQUEST_TIMEOUT_S)
            if not keep:
                self.close()
            err = None if status == 200 and b'"predictions"' in body else f"HTTP {status}"
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError,
                TimeoutError) as e:
            self.close()
            err = type(e).__name__
        return time.perf_counter() - t, err

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(port: int, request: bytes, clients: int, duration: float, max_requests: int,
               warmup: float) -> dict:
    """`clients` loops posting until the time or request budget is spent; the warm-up
    requests are not counted."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    pool = [Client(port, request) for _ in range(clients)]
    warm_end = time.monotonic() + warmup
    while time.monotonic() < warm_end:
        await asyncio.gather(*(c.post() for c in pool))
    end = time.monotonic() + duration
    start = time.perf_counter()

    async def worker(client: Client) -> None:
        nonlocal sent
        while time.monotonic() < end and sent < max_requests:
            sent += 1
            seconds, err = await client.post()
            if err:
                errors[err] = errors.get(err, 0) + 1
            else:
                latencies.append(seconds)

    await asyncio.gather(*(worker(c) for c in pool))
    wall = time.perf_counter() - start
    for c in pool:
        c.close()
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": sent, "ok": len(latencies), "errors": sum(errors.values()),
        "error_kinds": errors, "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_ms": round(float(lat.mean()), 1),
    }


def prepare_bundle(model: str, int8: bool) -> None:
    """Export outside the measurement: model.onnx (serve would otherwise export at startup,
    and the ready time is for a bundle that has it) and, for the int8 run, model.int8.onnx."""
    from imgrec.bundle import ONNX_INT8_FILE
    from imgrec.export import export_bundle
    from imgrec.zoo import open_bundle

    bundle = open_bundle(model, need_weights=True)
    if not bundle.onnx_path.is_file() or (int8 and not bundle.derived_current(ONNX_INT8_FILE)):
        export_bundle(model, int8=int8)


def servers(args) -> dict[str, tuple[list[str], str]]:
    py = sys.executable
    imgrec = [py, "-m", "imgrec.cli", "serve", args.model, "--workers", str(args.workers),
              "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
              "--log-level", "warning"]
    flask = [py, str(ROOT / "benchmarks" / "flask_baseline.py"), "--model", args.model]
    table = {"imgrec": (imgrec, "/v1/predict"),
             "imgrec_int8": (imgrec + ["--int8"], "/v1/predict")}
    for threads in args.flask_torch_threads:
        table[flask_name(threads)] = (flask + (["--torch-threads", str(threads)] if threads
                                               else []), "/predict")
    return table


def flask_name(threads: int) -> str:
    """flask (PyTorch's own thread count), flask_1thread, flask_2threads..."""
    return "flask" if not threads else f"flask_{threads}thread" + ("s" if threads > 1 else "")


def summarise(runs: dict[str, dict]) -> dict:
    """Ratios to the baseline and whether the targets are met. The baseline is the Flask run
    with the most requests/s: which thread count serves Flask best depends on the machine's
    moment (two PyTorch threads won on a quiet machine, one on a busy one)."""
    out: dict = {}
    flasks = {n: r for n, r in runs.items() if n.startswith("flask")}
    best = max(flasks, key=lambda n: flasks[n]["requests_per_s"], default=None)
    flask = flasks.get(best)
    if best:
        out["baseline"] = best
    for name in ("imgrec", "imgrec_int8"):
        r = runs.get(name)
        if not (r and flask and flask["requests_per_s"]):
            continue
        ratio = round(r["requests_per_s"] / flask["requests_per_s"], 2)
        out[f"{name}_ratio"] = ratio
        out[f"{name}_target_met"] = bool(ratio >= TARGET_RATIO and r["p99_ms"] <= flask["p99_ms"]
                                         and r["errors"] == 0 and flask["errors"] == 0)
    ready = [r["ready_s"] for n, r in runs.items() if n.startswith("imgrec")]
    if ready:
        out["ready_target_met"] = max(ready) <= TARGET_READY_S
    return out


def run_one(name: str, cmd: list[str], path: str, image: bytes, args) -> dict:
    port = free_port()
    proc, ready = start([*cmd, "--port", str(port)], port)
    try:
        print(f"{name}: ready in {ready:.2f} s; {args.clients} clients for "
              f"{args.duration:.0f}s ...", flush=True)
        request = multipart_request(path, port, image, args.image.name)
        r = asyncio.run(load(port, request, args.clients, args.duration, args.max_requests,
                             args.warmup))
    finally:
        stop(proc)
    r["ready_s"] = round(ready, 2)
    print(f"  {r['requests_per_s']:8.1f} requests/s   p50 {r['p50_ms']:7.1f} ms   "
          f"p99 {r['p99_ms']:7.1f} ms   errors {r['errors']}", flush=True)
    return r


def main() -> None:
    from imgrec.serve.config import ServeConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per server")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds per server, not counted")
    ap.add_argument("--max-requests", type=int, default=20000, help="per server")
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--workers", type=int, default=1, help="imgrec serve --workers")
    ap.add_argument("--max-batch", type=int, default=ServeConfig().max_batch,
                    help="imgrec serve --max-batch (default: its own)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--only", nargs="+", choices=["imgrec", "imgrec_int8", "flask"],
                    help="run these servers only (default: all; flask: one run per "
                         "--flask-torch-threads)")
    ap.add_argument("--flask-torch-threads", type=int, nargs="+", default=[0, 1],
                    help="the Flask baseline's PyTorch threads, one run each (0: PyTorch's "
                         "own); the ratios are to the fastest (default: 0 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    names = args.only or ["imgrec", "imgrec_int8", "flask"]
    prepare_bundle(args.model, "imgrec_int8" in names)
    image = args.image.read_bytes()
    from PIL import Image

    size = Image.open(args.image).size
    table = servers(args)
    runs = {name: run_one(name, *table[name], image, args) for name in table
            if name in names or (name.startswith("flask") and "flask" in names)}
    result: dict = {
        "clients": args.clients, "duration_s": args.duration, "image": str(args.image.name),
        "image_size": list(size), "model": args.model, "imgrec_workers": args.workers,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "flask_torch_threads": args.flask_torch_threads,
        "load_generator": "asyncio sockets, one connection per client, request bytes built once",
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "runs": runs, **summarise(runs),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # the sitting
    }
    for name in ("imgrec", "imgrec_int8"):
        if f"{name}_ratio" in result:
            met = "met" if result[f"{name}_target_met"] else "NOT met"
            print(f"{name} / {result['baseline']} requests/s: {result[f'{name}_ratio']}x  "
                  f"(target >= "
                  f"{TARGET_RATIO:g}x, p99 no worse, no errors: {met})")
    if "ready_target_met" in result:
        met = "met" if result["ready_target_met"] else "NOT met"
        print(f"ready <= {TARGET_READY_S:g} s: {met}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
