"""What one server process is told: the model, the limits, the micro-batching window, the
overload and slow-client bounds, the API keys and the CORS origins."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..images import MAX_PIXELS
from ..predict import MAX_LANES, available_cores

CONFIG_ENV = "IMGREC_SERVE_CONFIG"
#: the fewest images a worker admits besides those decoding (`queue_limit`): what 1.5 batches
#: of 16 held before the default batch became 4, so 16 clients are never refused
QUEUE_IMAGES = 24


def check_origin(origin: str) -> str:
    """A browser origin as CORS compares it, byte for byte: scheme://host[:port], nothing
    after (`https://app.example/` or `app.example` were taken, and every browser request
    from the page was then refused); `*` for any."""
    from urllib.parse import urlsplit

    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or \
            parts.query or parts.fragment or "@" in parts.netloc:
        from ..errors import InputError

        raise InputError(f"--cors-origin {origin!r} is not a browser origin",
                         "give scheme://host[:port] with no path or trailing slash, e.g. "
                         "https://app.example.com")
    return origin


@dataclass
class ServeConfig:
    """Everything `imgrec serve` passes to each worker process (as JSON in the environment)."""

    model: str | None = None
    #: 4: a single-threaded ONNX Runtime lane runs Lite0 at 6.3 ms an image at batch 1-4 and
    #: 7.8 ms at batch 16 (cache); under 16 clients 176-178 req/s against 164-175 and p99
    #: 111-115 ms against 162-174 (benchmarks/serve_load.py, session 9)
    max_batch: int = 4
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    threads: int | None = None  # ONNX Runtime intra-op threads (default: cores / workers)
    #: serve model.int8.onnx (`imgrec export MODEL --int8`) instead of the float32 model.onnx
    int8: bool = False
    #: inference threads per worker, each with its own ONNX Runtime session of
    #: threads / lanes threads (default: see `engine_lanes`)
    lanes: int | None = None
    workers: int = 1
    max_pixels: int = MAX_PIXELS
    max_files: int = 32  # images per /v1/predict/batch request
    default_top_k: int = 5
    #: run the bundle in PyTorch when it has no model.onnx (set by `imgrec serve` after an
    #: export failed; a plain deployment never imports torch)
    torch_fallback: bool = False
    #: images a worker holds at once (decoding, waiting for a batch, in the running batch);
    #: past it a request is refused at once with 503 + Retry-After (default: see `queue_limit`)
    max_queue: int | None = None
    #: the longest an image may wait, once its upload is in, before it is answered 503
    timeout_ms: float = 10_000.0
    #: the longest a request body may take to arrive; past it 408
    body_timeout_s: float = 30.0
    #: request bodies held in memory at once, all requests of a worker together; past it 503
    #: (default: 16 uploads of the largest size)
    upload_buffer_mb: float | None = None
    #: connections a worker keeps open at once (uvicorn's limit_concurrency; default from the
    #: file-descriptor limit)
    max_connections: int | None = None
    #: Bearer keys: when any is set, the API, /metrics and /openapi.json need one
    api_keys: list[str] = field(default_factory=list, repr=False)
    #: origins allowed to call the API from a browser (CORS); none: CORS is off
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api_keys = [k for k in self.api_keys if k]
        self.cors_origins = [check_origin(o) for o in self.cors_origins]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def engine_threads(self) -> int:
        """ONNX Runtime threads per worker so that workers x threads <= cores."""
        return self.threads or max(1, available_cores() // max(1, self.workers))

    @property
    def engine_lanes(self) -> int:
        """--lanes, else one single-threaded session per ONNX Runtime thread, at most
        MAX_LANES (each lane holds a copy of the model)."""
        return max(1, min(self.lanes or MAX_LANES, self.engine_threads))

    @property
    def lane_threads(self) -> int:
        """ONNX Runtime intra-op threads of each lane's session."""
        return max(1, self.engine_threads // self.engine_lanes)

    @property
    def decode_threads(self) -> int:
        """Images decoded at once per worker (a big photo holds tens of MB while it decodes)."""
        return max(2, available_cores() // max(1, self.workers))

    @property
    def queue_limit(self) -> int:
        """--max-queue, else the batch running and half a batch waiting (at least
        QUEUE_IMAGES: small batches need not mean a short queue) and an image for each decode
        thread: the engine never starves for work, and a request admitted under overload waits
        for a few batches, never for a backlog."""
        running = max(QUEUE_IMAGES, self.max_batch + self.max_batch // 2)
        return self.max_queue or running + self.decode_threads

    @property
    def upload_buffer_bytes(self) -> int:
        mb = self.upload_buffer_mb or 16 * self.max_upload_mb
        return int(mb * 1024 * 1024)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        raw = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(raw)) if raw else cls()
