"""The loaded model behind the routes: bundle, engine, micro-batcher and the decode pool.

One Service per app, built by `create_app` (so a broken bundle fails at startup) and handed to
the routes by the `get_service` dependency, never through a closure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import anyio
from fastapi import Depends, Request

from ..bundle import serving_onnx_path
from ..contract import load_input
from ..errors import BundleError, ImgrecError, InputError
from ..predict import OnnxEngine, Predictor, int8_onnx_path, make_engine
from ..zoo import open_bundle
from .batching import ENGINE_NICENESS, Admission, Expired, MicroBatcher, lower_priority
from .config import ServeConfig
from .errors import Overloaded, TimedOut, public
from .metrics import Metrics
from .schemas import BatchFailure, BatchPrediction, ImageError, ModelInfo, Prediction
from .uploads import shown_name

#: after a request is shed, /readyz answers 503 for this long (a balancer sends traffic elsewhere)
SHED_NOT_READY_S = 1.0

log = logging.getLogger("imgrec.serve")


class Service:
    """The loaded model: bundle, engine (ONNX Runtime, or PyTorch as the CLI's fallback),
    micro-batcher; it turns image bytes into predictions."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        bundle = open_bundle(config.model, need_weights=False)
        self.bundle = bundle
        self.name = bundle.name
        self.onnx_file = (int8_onnx_path(bundle, config.model) if config.int8
                          else serving_onnx_path(bundle))
        self.predictor = Predictor(bundle, engine=_at_low_priority(self._engine))
        lanes = [self.predictor] + [Predictor(bundle, engine=_at_low_priority(self._engine))
                                    for _ in range(config.engine_lanes - 1 if self.on_onnx
                                                   else 0)]
        self.batcher = MicroBatcher([p.probabilities for p in lanes], config.max_batch,
                                    config.max_wait_ms, metrics.on_batch, ENGINE_NICENESS)
        self.admission = Admission(config.queue_limit, metrics.queue_depth.set)
        self.last_shed = float("-inf")
        # Decoding a big photo holds tens of MB: bound how many decode at once.
        self.decode_limiter = anyio.CapacityLimiter(config.decode_threads)

    def _engine(self):
        """ONNX Runtime on the exported file; PyTorch only for a network that cannot be
        exported (the CLI has said so in one line), and only where torch is installed."""
        bundle, config = self.bundle, self.config
        if self.onnx_file.is_file():
            return OnnxEngine(bundle, config.lane_threads, self.onnx_file)
        hint = f"run `imgrec export {config.model or 'imagenet'}` first"
        if not config.torch_fallback:
            raise BundleError(f"{bundle.path}: no model.onnx to serve", hint)
        try:
            engine = make_engine(bundle, "torch", "cpu")
        except ModuleNotFoundError:
            raise BundleError(f"{bundle.path}: no model.onnx to serve, and PyTorch is not "
                              "installed to run it without one", hint) from None
        log.warning("%s has no model.onnx: serving it with PyTorch", bundle.path)
        return engine

    @property
    def on_onnx(self) -> bool:
        return self.predictor.engine.name in ("onnx", "int8")

    def describe(self) -> ModelInfo:
        c, config = self.bundle.preprocess, self.config
        return ModelInfo(
            model=self.name, architecture=self.bundle.architecture.get("name"),
            classes=len(self.bundle.classes), labels=self.bundle.classes,
            input_size=c.input_size, channels=c.channels, preprocess=c.to_dict(),
            engine="onnxruntime" if self.on_onnx else "pytorch",
            onnx_file=self.onnx_file.name if self.on_onnx else None,
            engine_threads=config.engine_threads, max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms, max_upload_bytes=config.max_upload_bytes,
            max_pixels=config.max_pixels, max_files=config.max_files,
            max_queue=self.admission.limit, timeout_ms=config.timeout_ms)

    def not_ready(self) -> str | None:
        """Why the server should get no traffic now (None: it is ready)."""
        if not self.batcher.alive:
            return "the inference thread has stopped"
        if self.admission.full:
            return f"the queue is full ({self.admission.depth} images)"
        if time.monotonic() - self.last_shed < SHED_NOT_READY_S:
            return "the server refused requests in the last second (overloaded)"
        return None

    def note_shed(self, reason: str) -> None:
        """A request was refused because the server is full (/readyz, /metrics)."""
        self.last_shed = time.monotonic()
        self.metrics.shed.labels(reason).inc()

    @contextmanager
    def admitted(self, images: int) -> Iterator[float]:
        """Hold `images` places in the queue while the block runs, and yield the deadline
        (time.monotonic()) by which their batch must start; refuse at once when full."""
        if not self.admission.enter(images):
            self.note_shed("queue_full")
            raise Overloaded(f"the server is busy ({self.admission.depth} images queued, the "
                             f"limit is {self.admission.limit}); retry in a moment")
        timeout = self.config.timeout_ms / 1000
        try:
            with anyio.fail_after(timeout):
                yield time.monotonic() + timeout
        except (TimeoutError, Expired):
            self.metrics.timed_out.inc()
            raise TimedOut(self.config.timeout_ms) from None
        finally:
            self.admission.leave(images)

    def top_k(self, requested: int | None) -> int:
        """The request's top_k, else the server's default; never more than there are labels."""
        return min(requested or self.config.default_top_k, len(self.bundle.classes))

    async def classify(self, data: bytes, top_k: int, name: str = "upload") -> list[Prediction]:
        """Bytes (called `name` in messages) -> top-k predictions; raises ImgrecError (4xx)
        for bad images, Overloaded (503) when the queue is full or the image waited past
        --timeout-ms."""
        if not data:
            raise _no_image()
        with self.admitted(1) as deadline:
            return await self._classify(data, top_k, deadline, name)

    async def _classify(self, data: bytes, top_k: int, deadline: float,
                        name: str = "upload") -> list[Prediction]:
        """Decoding runs in a bounded worker pool, inference in the micro-batcher: never on
        the event loop."""
        pixels = await anyio.to_thread.run_sync(
            load_input, data, self.predictor.contract, None, self.config.max_pixels, name,
            limiter=self.decode_limiter)
        probs = await self.batcher.infer(pixels, deadline)
        return [Prediction(**p.to_dict()) for p in self.predictor.top_k(probs[None], top_k)[0]]

    async def classify_each(self, uploads: list[tuple[str, bytes]],
                            top_k: int) -> list[BatchPrediction | BatchFailure]:
        """Every upload classified concurrently; a bad image gets its own error, in its place,
        and does not fail the others."""
        results: list[BatchPrediction | BatchFailure | None] = [None] * len(uploads)
        expired: list[Expired] = []

        async def one(i: int, name: str, data: bytes, deadline: float) -> None:
            try:
                if not data:
                    raise _no_image()
                results[i] = BatchPrediction(filename=name, predictions=await self._classify(
                    data, top_k, deadline, shown_name(name)))
            except ImgrecError as e:
                self.metrics.errors.labels(e.code).inc()
                results[i] = BatchFailure(filename=name, error=ImageError(
                    code=e.code, message=public(str(e)), status=e.http_status))
            except Expired as e:  # raised outside the task group, as one 503
                expired.append(e)

        # the request is admitted, refused or timed out as a whole
        with self.admitted(len(uploads)) as deadline:
            async with anyio.create_task_group() as tg:
                for i, (name, data) in enumerate(uploads):
                    tg.start_soon(one, i, name, data, deadline)
            if expired:
                raise expired[0]
        return [r for r in results if r is not None]

    async def aclose(self) -> None:
        """Drain the batcher (uvicorn has finished the in-flight requests) and stop it."""
        await anyio.to_thread.run_sync(self.batcher.close)


def _at_low_priority(build):
    """`build()` in a thread of lowered priority: the threads ONNX Runtime starts for the
    session inherit it, so inference yields the CPU to the event loop."""
    out: dict = {}

    def run() -> None:
        lower_priority()
        try:
            out["value"] = build()
        except BaseException as e:  # raised again in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name="imgrec-engine-setup")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _no_image() -> InputError:
    return InputError("the request carries no image (empty body or file)",
                      "send the image as multipart field `file` or as the raw body")


async def get_service(request: Request) -> Service:
    """The dependency every route takes its Service from (the app's, set by create_app)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
