"""Prometheus metrics for `GET /metrics`: requests, latency, batch sizes, errors, and the
overload figures (requests shed, images timed out, queue depth).

Each app gets its own registry (several apps in one process, as in tests, never collide).
With `--workers N`, `imgrec serve` sets PROMETHEUS_MULTIPROC_DIR and every worker's numbers
are summed at scrape time by prometheus_client's multiprocess collector.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imgrec_requests", "HTTP requests answered",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("imgrec_request_latency_seconds",
                                 "time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("imgrec_errors", "error responses by error code", ["code"],
                              registry=r)
        self.images = Counter("imgrec_images", "images classified", registry=r)
        self.batch_size = Histogram("imgrec_batch_size", "images per inference batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("imgrec_inference_seconds", "time of one inference batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.shed = Counter("imgrec_shed", "requests refused at once with 503 because the "
                            "server was full (reason: queue_full, upload_buffer_full)",
                            ["reason"], registry=r)
        self.timed_out = Counter("imgrec_timed_out", "requests answered 503 because their "
                                 "image waited past --timeout-ms", registry=r)
        self.queue_depth = Gauge("imgrec_queue_depth", "images held now: decoding, waiting "
                                 "for a batch or in the running batch", registry=r,
                                 multiprocess_mode="livesum")
        for reason in ("queue_full", "upload_buffer_full"):  # listed (as 0) from the start
            self.shed.labels(reason)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder and os.path.isdir(folder):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=folder)
            return generate_latest(registry)
        return generate_latest(self.registry)
