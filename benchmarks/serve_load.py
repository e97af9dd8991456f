"""Load test: `imgrec serve` against the workshop design (benchmarks/flask_baseline.py), in
the same sitting, on loopback only, bounded in requests and in time.

N concurrent clients (default 16) post a ~500 px JPEG (the bundled chelsea.jpg) to each
server in turn, both running the efficientnet_lite0 ImageNet model; we report requests/s,
p50, p99 and errors, write benchmarks/results/serve_load.json, and print the ratio.
Target: imgrec >= 2.5x Flask's requests/s, with p99 no worse and zero errors.

    python benchmarks/serve_load.py                  # 30 s per server (the measurement)
    python benchmarks/serve_load.py --duration 3     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str, timeout: float = 180.0) -> subprocess.Popen:
    """Start a server and wait until /healthz answers."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server did not start in {timeout:.0f}s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, image: bytes, clients: int, duration: float, max_requests: int,
               warmup: float) -> dict:
    """`clients` loops posting the image (multipart `file`) until the time or request budget
    is spent; the warm-up requests are not counted."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def post() -> tuple[float, str | None]:
            t = time.perf_counter()
            try:
                r = await client.post(url, files={"file": ("chelsea.jpg", image, "image/jpeg")})
                err = None if r.status_code == 200 and r.json().get("predictions") else \
                    f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                err = type(e).__name__
            return time.perf_counter() - t, err

        warm_end = time.monotonic() + warmup
        while time.monotonic() < warm_end:
            await asyncio.gather(*(post() for _ in range(clients)))

        end = time.monotonic() + duration
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < end and sent < max_requests:
                sent += 1
                seconds, err = await post()
                if err:
                    errors[err] = errors.get(err, 0) + 1
                else:
                    latencies.append(seconds)

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": sent, "ok": len(latencies), "errors": sum(errors.values()),
        "error_kinds": errors, "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_ms": round(float(lat.mean()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per server")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds per server, not counted")
    ap.add_argument("--max-requests", type=int, default=20000, help="per server")
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--workers", type=int, default=1, help="imgrec serve --workers")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--int8", action="store_true", help="serve model.int8.onnx")
    ap.add_argument("--only", choices=["imgrec", "flask"], help="run one server only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from imgrec.export import export_bundle, serving_onnx_path
    from imgrec.zoo import open_bundle

    # Export outside the measurement (serve would otherwise do it at startup).
    bundle = open_bundle(args.model, need_weights=True)
    wants = "model.int8.onnx" if args.int8 else "model.onnx"
    if serving_onnx_path(bundle).name != wants or not serving_onnx_path(bundle).is_file():
        export_bundle(args.model, int8=args.int8)
    image = args.image.read_bytes()
    from PIL import Image

    size = Image.open(args.image).size
    py = sys.executable
    runs: dict[str, dict] = {}
    servers = {
        "imgrec": lambda port: [py, "-m", "imgrec.cli", "serve", args.model, "--port", str(port),
                                "--workers", str(args.workers), "--max-batch",
                                str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                                "--log-level", "warning"],
        "flask": lambda port: [py, str(ROOT / "benchmarks" / "flask_baseline.py"), "--model",
                               args.model, "--port", str(port)],
    }
    paths = {"imgrec": "/v1/predict", "flask": "/predict"}
    for name in ([args.only] if args.only else ["imgrec", "flask"]):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start(servers[name](port), base)
        try:
            print(f"{name}: {args.clients} clients for {args.duration:.0f}s ...", flush=True)
            runs[name] = asyncio.run(load(base + paths[name], image, args.clients,
                                          args.duration, args.max_requests, args.warmup))
        finally:
            stop(proc)
        r = runs[name]
        print(f"  {r['requests_per_s']:8.1f} requests/s   p50 {r['p50_ms']:7.1f} ms   "
              f"p99 {r['p99_ms']:7.1f} ms   errors {r['errors']}", flush=True)

    result: dict = {
        "clients": args.clients, "duration_s": args.duration, "image": str(args.image.name),
        "image_size": list(size), "model": args.model, "imgrec_workers": args.workers,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "int8": args.int8,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "runs": runs,
    }
    if "imgrec" in runs and "flask" in runs:
        a, b = runs["imgrec"], runs["flask"]
        ratio = a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else None
        result["ratio"] = round(ratio, 2) if ratio else None
        result["target_met"] = bool(ratio and ratio >= 2.5 and a["p99_ms"] <= b["p99_ms"]
                                    and a["errors"] == 0 and b["errors"] == 0)
        print(f"imgrec / flask requests/s: {result['ratio']}x  (target >= 2.5x, p99 no worse, "
              f"no errors: {'met' if result['target_met'] else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
