"""What one server process is told: the model, the limits, the micro-batching window."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..images import MAX_PIXELS

CONFIG_ENV = "IMGREC_SERVE_CONFIG"


def available_cores() -> int:
    """The cores this process may use (a container's CPU set, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class ServeConfig:
    """Everything `imgrec serve` passes to each worker process (as JSON in the environment)."""

    model: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    threads: int | None = None  # ONNX Runtime intra-op threads (default: cores / workers)
    workers: int = 1
    max_pixels: int = MAX_PIXELS
    max_files: int = 32  # images per /v1/predict/batch request
    default_top_k: int = 5
    #: run the bundle in PyTorch when it has no model.onnx (set by `imgrec serve` after an
    #: export failed; a plain deployment never imports torch)
    torch_fallback: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def engine_threads(self) -> int:
        """ONNX Runtime threads per worker so that workers x threads <= cores."""
        return self.threads or max(1, available_cores() // max(1, self.workers))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        raw = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(raw)) if raw else cls()
