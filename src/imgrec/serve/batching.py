"""Micro-batching: concurrent requests are coalesced into one batch for the inference engine.

A network runs a batch of 8 images in far less than 8 times one image's time. Each engine
(lane) has one inference thread, and lanes x ONNX Runtime threads never exceed the cores, so
the threads never fight each other. Requests wait at most `max_wait_ms` for company; a batch
never exceeds `max_batch`. Inference runs in this module's threads, never on the event loop.

Overload is refused, not queued forever: `Admission` bounds the images a server holds at once
(decoding, queued here, or in the running batch), and an image whose deadline has passed
before its batch starts is dropped with `Expired` instead of being served late.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

#: how much lower than the event loop the inference threads run (nice steps): on a busy
#: machine the loop, which answers /healthz, reads uploads and refuses overload, comes first,
#: and inference takes every cycle left
ENGINE_NICENESS = 5


def lower_priority(niceness: int = ENGINE_NICENESS) -> None:
    """Lower the calling thread's CPU priority by `niceness` (Linux, where priority is per
    thread and threads a thread starts inherit it; elsewhere nothing)."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except OSError:
        pass


class Expired(Exception):
    """The image waited past its deadline; it was not run."""


class Admission:
    """At most `limit` images admitted at once. `enter(n)` admits n images or refuses them
    (False); an oversized request is admitted only into an empty pipeline, so it is never
    refused forever. `on_depth(depth)` is told every change (the queue-depth gauge)."""

    def __init__(self, limit: int, on_depth: Callable[[int], None] | None = None):
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        self.limit = limit
        self.depth = 0
        self.on_depth = on_depth
        self._lock = threading.Lock()

    def enter(self, n: int = 1) -> bool:
        with self._lock:
            if self.depth and self.depth + n > self.limit:
                return False
            self.depth += n
            depth = self.depth
        if self.on_depth is not None:
            self.on_depth(depth)
        return True

    def leave(self, n: int = 1) -> None:
        with self._lock:
            self.depth = max(0, self.depth - n)
            depth = self.depth
        if self.on_depth is not None:
            self.on_depth(depth)

    @property
    def full(self) -> bool:
        return self.depth >= self.limit


@dataclass
class _Item:
    pixels: np.ndarray
    future: Future
    deadline: float | None = None  # time.monotonic() past which the image is not run


class MicroBatcher:
    """`await batcher.infer(pixels)` -> the model's output row for one uint8 C x H x W image.

    `run` takes a uint8 N x C x H x W batch and returns N rows (for imgrec: probabilities);
    a list of such callables gives one inference thread (a lane) to each, all taking batches
    from the one queue. Two single-threaded ONNX Runtime sessions side by side measured ~20%
    more images/s per CPU second on 2 cores than one session splitting each batch over two
    threads (no hand-off between the threads inside every operator).
    `on_batch(size, seconds)` is told about every batch (metrics).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray] | list[Callable], max_batch: int
                 = 16, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float], None] | None = None, niceness: int = 0):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runs = list(run) if isinstance(run, (list, tuple)) else [run]
        if not self.runs:
            raise ValueError("the batcher needs at least one engine")
        self.niceness = niceness
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True,
                                          name=f"imgrec-batcher-{i}")
                         for i in range(len(self.runs))]
        for t in self._threads:
            t.start()

    @property
    def lanes(self) -> int:
        return len(self._threads)

    @property
    def run(self) -> Callable[[np.ndarray], np.ndarray]:
        """The first lane's engine; setting it gives every lane that one callable (tests wrap
        it to hold or count batches)."""
        return self.runs[0]

    @run.setter
    def run(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.runs = [fn] * len(self.runs)

    # -- producers (any thread, or the event loop) --------------------------------------------
    def submit(self, pixels: np.ndarray, deadline: float | None = None) -> Future:
        """Queue one image; the Future gets its output row, the engine's exception, or
        `Expired` when `deadline` (time.monotonic()) passes before its batch starts."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(_Item(pixels, fut, deadline))
        return fut

    async def infer(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """The output row; cancelling the await (a request's timeout) takes the image out of
        the queue if its batch has not started."""
        return await asyncio.wrap_future(self.submit(pixels, deadline))

    @property
    def depth(self) -> int:
        """Images queued for a batch (not counting the batch running)."""
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the threads (graceful shutdown)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:  # one stop mark per lane, after everything queued
                self._queue.put(None)
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    @property
    def alive(self) -> bool:
        """Every lane is running (one that died would leave its share of work undone)."""
        return all(t.is_alive() for t in self._threads)

    # -- the inference thread -----------------------------------------------------------------
    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        """The first item plus whatever arrives within max_wait (up to max_batch); True when
        this lane's stop mark came."""
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    @staticmethod
    def _runnable(batch: list[_Item]) -> list[_Item]:
        """The items still wanted: not cancelled, and not past their deadline (those hear
        `Expired`)."""
        now, keep = time.monotonic(), []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(Expired("the image waited past its deadline"))
                continue
            keep.append(item)
        return keep

    def _loop(self, lane: int) -> None:
        lower_priority(self.niceness)
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            batch = self._runnable(batch)
            if not batch:
                continue
            start = time.perf_counter()
            try:
                out = self.runs[lane](np.stack([item.pixels for item in batch]))
            except BaseException as e:  # the engine failed: every waiter hears why
                for item in batch:
                    item.future.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            for item, row in zip(batch, out, strict=True):
                item.future.set_result(row)
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
