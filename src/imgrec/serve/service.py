"""The loaded model behind the routes: bundle, engine, micro-batcher and the decode pool.

One Service per app, built by `create_app` (so a broken bundle fails at startup) and handed to
the routes by the `get_service` dependency, never through a closure.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import Depends, Request

from ..bundle import serving_onnx_path
from ..contract import load_input
from ..errors import BundleError, ImgrecError, InputError
from ..predict import OnnxEngine, Predictor, make_engine
from ..zoo import open_bundle
from .batching import MicroBatcher
from .config import ServeConfig, available_cores
from .metrics import Metrics
from .schemas import BatchFailure, BatchPrediction, ImageError, ModelInfo, Prediction

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
        self.onnx_file = serving_onnx_path(bundle)
        self.predictor = Predictor(bundle, engine=self._engine())
        self.batcher = MicroBatcher(self.predictor.probabilities, config.max_batch,
                                    config.max_wait_ms, metrics.on_batch)
        # Decoding a big photo holds tens of MB: bound how many decode at once.
        self.decode_limiter = anyio.CapacityLimiter(max(2, available_cores()
                                                        // max(1, config.workers)))

    def _engine(self):
        """ONNX Runtime on the exported file; PyTorch only for a network that cannot be
        exported (the CLI has said so in one line), and only where torch is installed."""
        bundle, config = self.bundle, self.config
        if self.onnx_file.is_file():
            return OnnxEngine(bundle, config.engine_threads, self.onnx_file)
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
        return self.predictor.engine.name == "onnx"

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
            max_pixels=config.max_pixels, max_files=config.max_files)

    def top_k(self, requested: int | None) -> int:
        """The request's top_k, else the server's default; never more than there are labels."""
        return min(requested or self.config.default_top_k, len(self.bundle.classes))

    async def classify(self, data: bytes, top_k: int) -> list[Prediction]:
        """Bytes -> top-k predictions; raises ImgrecError (4xx) for bad images. Decoding runs
        in a bounded worker pool, inference in the micro-batcher: never on the event loop."""
        if not data:
            raise InputError("the request carries no image (empty body or file)",
                             "send the image as multipart field `file` or as the raw body")
        pixels = await anyio.to_thread.run_sync(
            load_input, data, self.predictor.contract, None, self.config.max_pixels,
            limiter=self.decode_limiter)
        probs = await self.batcher.infer(pixels)
        return [Prediction(**p.to_dict()) for p in self.predictor.top_k(probs[None], top_k)[0]]

    async def classify_each(self, uploads: list[tuple[str, bytes]],
                            top_k: int) -> list[BatchPrediction | BatchFailure]:
        """Every upload classified concurrently; a bad image gets its own error, in its place,
        and does not fail the others."""
        results: list[BatchPrediction | BatchFailure | None] = [None] * len(uploads)

        async def one(i: int, name: str, data: bytes) -> None:
            try:
                results[i] = BatchPrediction(filename=name,
                                             predictions=await self.classify(data, top_k))
            except ImgrecError as e:
                self.metrics.errors.labels(e.code).inc()
                results[i] = BatchFailure(filename=name, error=ImageError(
                    code=e.code, message=str(e), status=e.http_status))

        async with anyio.create_task_group() as tg:
            for i, (name, data) in enumerate(uploads):
                tg.start_soon(one, i, name, data)
        return [r for r in results if r is not None]

    async def aclose(self) -> None:
        """Drain the batcher (uvicorn has finished the in-flight requests) and stop it."""
        await anyio.to_thread.run_sync(self.batcher.close)


def get_service(request: Request) -> Service:
    """The dependency every route takes its Service from (the app's, set by create_app)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
