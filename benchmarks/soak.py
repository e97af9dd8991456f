"""Soak: `imgrec serve` under a steady load for minutes, watched for leaks and errors.

8 clients (closed loops, one keep-alive connection each, as in benchmarks/overload.py) post
a ~500 px JPEG to a real `imgrec serve` subprocess for --minutes minutes (default 10); every
minute we note the requests answered, the p99 and the server's RSS. Reported: the RSS at
minute 1 against the end (a leak shows as steady growth; target < 10%), every non-200 answer
and connection error (target: none), and the exit status after SIGTERM. Writes
benchmarks/results/soak.json.

    python benchmarks/soak.py                 # 10 minutes
    python benchmarks/soak.py --minutes 2     # a shorter run
"""

from __future__ import annotations

import argparse
import asyncio

from common import write_result
from overload import IMAGE, load, rss_mb, start_server, stop_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="imagenet")
    ap.add_argument("--serve-args", default="", help="extra `imgrec serve` options")
    args = ap.parse_args()
    image = IMAGE.read_bytes()
    proc, base = start_server(args.model, args.serve_args.split())
    minutes: list[dict] = []
    try:
        asyncio.run(load(base, image, args.clients, 10))  # warm-up, not counted
        rss_start = rss_mb(proc.pid)
        whole, rest = int(args.minutes), args.minutes - int(args.minutes)
        for i, seconds in enumerate([60.0] * whole + ([rest * 60] if rest else [])):
            r = asyncio.run(load(base, image, args.clients, seconds))
            r["rss_mb"] = round(rss_mb(proc.pid), 1)
            minutes.append(r)
            print(f"minute {i + 1}: {r['ok_per_s']} ok/s, p50 {r['p50_ms']} ms, p99 "
                  f"{r['p99_ms']} ms, answers {r['answers']}, connection errors "
                  f"{r['connection_errors']}, RSS {r['rss_mb']} MB", flush=True)
    finally:
        status = stop_server(proc)
    first, last = minutes[0]["rss_mb"], minutes[-1]["rss_mb"]
    not_ok = sum(m["answers"].get(s, 0) for m in minutes for s in m["answers"] if s != 200)
    errors = sum(m["connection_errors"] for m in minutes)
    result = {
        "model": args.model, "clients": args.clients, "minutes": args.minutes,
        "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_minute_1": first,
        "rss_mb_end": last, "rss_growth_pct": round(100 * (last - first) / first, 1),
        "requests_ok": sum(m["ok"] for m in minutes), "answers_not_200": not_ok,
        "connection_errors": errors, "exit_status_after_sigterm": status, "per_minute": minutes,
    }
    print(f"\nRSS minute 1 {first} MB -> end {last} MB ({result['rss_growth_pct']:+}%; target "
          f"< 10%); {result['requests_ok']} ok, {not_ok} not 200, {errors} connection errors; "
          f"exit status after SIGTERM {status}")
    write_result("soak", result)


if __name__ == "__main__":
    main()
