"""Overload and slow clients: `imgrec serve` refuses what it cannot serve in time instead of
queueing it, keeps answering /healthz, and slow clients cannot hold it.

Against a real `imgrec serve` subprocess on loopback (default model: the offline ImageNet
efficientnet_lite0, default serve options):

1. 16 clients for --baseline seconds: the p99 of the 200s, the reference;
2. 64 clients for --duration seconds (30): connection errors, 5xx other than 503, whether
   every 503 carried Retry-After, the p99 of the 200s (target <= 3x the 16-client p99),
   /healthz p99 meanwhile (target < 100 ms), the server's RSS growth (target < 10%);
3. 1100 slow-body connections (raw sockets sending 3 bytes/s of a 100 kB body) while 4
   clients post normal images: /healthz and the normal requests still answered, every slow
   one answered 408 once the body timeout is up.

/healthz is probed from a separate process every 50 ms, so the load generator's own event
loop does not inflate its latency. Clients honour Retry-After (sleeping at most 1 s) unless
--no-backoff. Prints the figures and writes benchmarks/results/overload.json.

    python benchmarks/overload.py
    python benchmarks/overload.py --baseline 5 --duration 5 --slow 200    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from common import IMGREC, ROOT, WORK, write_result

IMAGE = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


# -- the server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], timeout: float = 600) -> tuple[subprocess.Popen,
                                                                               str]:
    """`imgrec serve MODEL` on a free port (exporting the model first if it must), healthy."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    WORK.mkdir(parents=True, exist_ok=True)
    log = open(WORK / "serve.log", "w")  # noqa: SIM115  (the server's output, for a failure)
    proc = subprocess.Popen([*IMGREC, "serve", model, "--port", str(port), "--log-level",
                             "warning", *extra], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log.name}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start")


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(40)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """The server's RSS every half second, in a thread, while a phase runs."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.start, rss_mb(self.pid)))
            self.stop.wait(0.5)

    def result(self) -> dict:
        """RSS before, 5 s in (the high-water mark of a full batch reached), at the end."""
        self.stop.set()
        self.thread.join()
        before, end = self.samples[0][1], rss_mb(self.pid)
        settled = next((mb for t, mb in self.samples if t >= 5), before)
        return {"before": round(before, 1), "at_5s": round(settled, 1), "end": round(end, 1),
                "max": round(max(mb for _, mb in self.samples), 1),
                "growth_pct": round(100 * (end - before) / before, 1),
                "growth_after_5s_pct": round(100 * (end - settled) / settled, 1),
                "every_5s": [round(mb, 1) for t, mb in self.samples[::10]]}


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


# -- /healthz, probed from another process --------------------------------------------------------
def _probe(base: str, seconds: float, out) -> None:
    times, errors = [], 0
    end = time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                ok = client.get(f"{base}/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                times.append(time.perf_counter() - t)
            else:
                errors += 1
            time.sleep(max(0.0, 0.05 - (time.perf_counter() - t)))
    out.put((times, errors))


class HealthProbe:
    """GET /healthz every 50 ms for `seconds`, in a child process."""

    def __init__(self, base: str, seconds: float):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=_probe, args=(base, seconds, self.queue), daemon=True)
        self.proc.start()

    def result(self) -> dict:
        times, errors = self.queue.get(timeout=120)
        self.proc.join(10)
        return {"probes": len(times) + errors, "errors": errors, "p50_ms": pct(times, 50),
                "p99_ms": pct(times, 99), "max_ms": pct(times, 100)}


# -- closed-loop clients ------------------------------------------------------------------------
def multipart_request(path: str, image: bytes) -> bytes:
    """The bytes of one keep-alive POST of `image` as the multipart field `file`."""
    boundary = "imgrec-overload-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"chelsea.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One client's keep-alive HTTP/1.1 connection, on raw asyncio streams: a load generator
    light enough (httpx's pool spent more CPU than the server at 64 connections) that on a
    small machine the server, not the client, is measured."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self.writer.write(raw)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(x.lower().split(": ", 1) for x in lines[1:] if ": " in x)
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Tally:
    def __init__(self) -> None:
        self.status: Counter[int] = Counter()
        self.conn_errors: Counter[str] = Counter()
        self.ok_latency: list[float] = []
        self.without_retry_after = 0
        self.bad_200 = 0

    def summary(self) -> dict:
        other_5xx = sum(n for s, n in self.status.items() if s >= 500 and s != 503)
        return {"answers": dict(sorted(self.status.items())), "ok": len(self.ok_latency),
                "connection_errors": sum(self.conn_errors.values()),
                "connection_error_kinds": dict(self.conn_errors), "other_5xx": other_5xx,
                "503": self.status[503], "503_without_retry_after": self.without_retry_after,
                "200_without_predictions": self.bad_200,
                "p50_ms": pct(self.ok_latency, 50), "p99_ms": pct(self.ok_latency, 99)}


async def _client(port: int, raw: bytes, end: float, tally: Tally, backoff: bool) -> None:
    conn = Connection(port)
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            status, headers, body = await conn.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            tally.conn_errors[type(e).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        seconds = time.perf_counter() - t
        tally.status[status] += 1
        if status == 200:
            tally.ok_latency.append(seconds)
            tally.bad_200 += b'"predictions":[{' not in body
        elif status == 503:
            after = headers.get("retry-after")
            tally.without_retry_after += after is None
            if backoff and after:
                await asyncio.sleep(min(float(after), 1.0))
    conn.close()


async def load(base: str, image: bytes, clients: int, seconds: float,
               backoff: bool = True) -> dict:
    """`clients` closed loops, each on its own connection, posting the image for `seconds`."""
    tally = Tally()
    port = int(base.rsplit(":", 1)[1])
    raw = multipart_request("/v1/predict", image)
    end = time.monotonic() + seconds
    start = time.perf_counter()
    await asyncio.gather(*(_client(port, raw, end, tally, backoff) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {**tally.summary(), "clients": clients, "seconds": round(wall, 1),
            "ok_per_s": round(len(tally.ok_latency) / wall, 1)}


# -- slow clients -------------------------------------------------------------------------------
async def _slow(port: int, announced: int, give_up: float) -> tuple[str, float]:
    """A POST whose body trickles in at 3 bytes/s: the server's answer (its status, or what
    went wrong) and when it came."""
    t = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return f"connect: {type(e).__name__}", 0.0
    writer.write(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {announced}\r\n\r\n".encode())
    answer = asyncio.ensure_future(reader.read(4096))
    try:
        while not answer.done() and time.monotonic() - t < give_up:
            writer.write(b"\xff\xd8\xff")
            try:
                await writer.drain()
            except ConnectionError:
                pass  # the server answered and closed: its answer is in the reader
            await asyncio.wait({answer}, timeout=1.0)
        if not answer.done():
            answer.cancel()
            return "no answer", time.monotonic() - t
        head = answer.result().split(b"\r\n", 1)[0].decode("latin-1")
        return (head.split()[1] if len(head.split()) > 1 else "closed"), time.monotonic() - t
    except ConnectionError as e:
        return f"reset: {type(e).__name__}", time.monotonic() - t
    finally:
        writer.close()


async def slow_phase(base: str, image: bytes, n: int, give_up: float) -> dict:
    port = int(base.rsplit(":", 1)[1])
    slow = [asyncio.ensure_future(_slow(port, 100_000, give_up)) for _ in range(n)]
    await asyncio.sleep(2)  # all connected and trickling
    normal = asyncio.ensure_future(load(base, image, 4, give_up - 10))
    answers = await asyncio.gather(*slow)
    kinds = Counter(a for a, _ in answers)
    after = [s for a, s in answers if a == "408"]
    return {"slow_connections": n, "slow_answers": dict(kinds),
            "seconds_to_408_median": round(float(np.median(after)), 1) if after else None,
            "normal": await normal}


# -- the run ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--baseline", type=float, default=15.0, help="seconds at --few clients")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds at --many clients")
    ap.add_argument("--few", type=int, default=16)
    ap.add_argument("--many", type=int, default=64)
    ap.add_argument("--slow", type=int, default=1100, help="slow-body connections")
    ap.add_argument("--no-backoff", action="store_true", help="retry a 503 at once")
    ap.add_argument("--serve-args", default="", help="extra `imgrec serve` options")
    args = ap.parse_args()
    raise_fd_limit(args.slow + 512)
    image = IMAGE.read_bytes()
    proc, base = start_server(args.model, args.serve_args.split())
    result: dict = {"model": args.model, "serve_args": args.serve_args,
                    "backoff": not args.no_backoff}
    try:
        result |= run_phases(args, base, image, proc.pid)
    finally:
        result["exit_status_after_sigterm"] = stop_server(proc)
    report(result)
    write_result("overload", result)


def run_phases(args, base: str, image: bytes, pid: int) -> dict:
    backoff = not args.no_backoff
    print(f"warm-up (3 s at {args.few} clients, 3 s at {args.many}), then {args.few} clients "
          f"for {args.baseline:.0f}s ...", flush=True)
    asyncio.run(load(base, image, args.few, 3))  # the shapes of both loads (half batches,
    asyncio.run(load(base, image, args.many, 3))  # full ones) before memory is measured
    few = asyncio.run(load(base, image, args.few, args.baseline, backoff))
    print(f"{args.many} clients for {args.duration:.0f}s ...", flush=True)
    rss = RssSampler(pid)
    probe = HealthProbe(base, args.duration)
    many = asyncio.run(load(base, image, args.many, args.duration, backoff))
    health = probe.result()
    rss = rss.result()
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    print(f"{args.slow} slow-body connections ...", flush=True)
    give_up = 30 + 25  # the default body timeout, and time to connect them all
    probe = HealthProbe(base, give_up - 5)
    slow = asyncio.run(slow_phase(base, image, args.slow, give_up))
    slow["healthz"] = probe.result()
    shed = [x for x in metrics.splitlines() if x.startswith(("imgrec_shed_total",
                                                             "imgrec_timed_out_total"))]
    return {"few": few, "many": many, "healthz_under_load": health,
            "rss_mb": rss,
            "server_counters": shed, "slow": slow}


def report(r: dict) -> None:
    few, many, health = r["few"], r["many"], r["healthz_under_load"]
    ratio = many["p99_ms"] / few["p99_ms"] if few["p99_ms"] and many["p99_ms"] else None
    r["p99_ratio"] = round(ratio, 2) if ratio else None
    slow = r["slow"]
    r["targets"] = {
        "no connection errors": many["connection_errors"] == 0,
        "no 5xx but 503": many["other_5xx"] == 0,
        "every 503 had Retry-After": many["503_without_retry_after"] == 0,
        "p99 of 200s <= 3x the 16-client p99": bool(ratio and ratio <= 3),
        "/healthz p99 < 100 ms": bool(health["p99_ms"] is not None and health["p99_ms"] < 100),
        "RSS growth < 10%": r["rss_mb"]["growth_pct"] < 10,
        "slow clients all 408": slow["slow_answers"].get("408", 0) == slow["slow_connections"],
        "normal requests answered among slow ones": slow["normal"]["ok"] > 0
        and slow["normal"]["connection_errors"] == 0,
        "/healthz answered among slow ones": slow["healthz"]["errors"] == 0,
        "exit 0 after SIGTERM": r["exit_status_after_sigterm"] == 0,
    }
    print(f"\n{few['clients']} clients: {few['ok_per_s']} ok/s, p50 {few['p50_ms']} ms, "
          f"p99 {few['p99_ms']} ms, answers {few['answers']}")
    print(f"{many['clients']} clients: {many['ok_per_s']} ok/s, p50 {many['p50_ms']} ms, "
          f"p99 {many['p99_ms']} ms ({r['p99_ratio']}x), answers {many['answers']}")
    print(f"  connection errors {many['connection_errors']} {many['connection_error_kinds']}, "
          f"5xx other than 503: {many['other_5xx']}, 503 without Retry-After: "
          f"{many['503_without_retry_after']}")
    print(f"  /healthz: p50 {health['p50_ms']} ms, p99 {health['p99_ms']} ms, max "
          f"{health['max_ms']} ms, errors {health['errors']} of {health['probes']}")
    m = r["rss_mb"]
    print(f"  RSS {m['before']} -> {m['end']} MB ({m['growth_pct']:+}%; every 5 s: "
          f"{m['every_5s']})")
    print(f"  server: {'; '.join(r['server_counters'])}")
    n = slow["normal"]
    print(f"{slow['slow_connections']} slow connections: answers {slow['slow_answers']} "
          f"(408 after {slow['seconds_to_408_median']} s median)")
    print(f"  meanwhile 4 clients: {n['ok']} ok, p99 {n['p99_ms']} ms, answers {n['answers']}, "
          f"connection errors {n['connection_errors']}; /healthz p99 "
          f"{slow['healthz']['p99_ms']} ms, errors {slow['healthz']['errors']}")
    print(f"exit status after SIGTERM: {r['exit_status_after_sigterm']}")
    for name, met in r["targets"].items():
        print(f"  [{'met' if met else 'NOT met'}] {name}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
