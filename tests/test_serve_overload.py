"""Overload is refused, not queued forever: a bounded queue (503 + Retry-After at once past
it), images older than --timeout-ms answered 503 rather than served late, /readyz, and the
shed and timed-out counts and the queue depth in /metrics. The engine is held by a gate, so
each state is reached exactly, not raced for."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient

from imgrec.serve.app import ServeConfig, create_app
from imgrec.serve.batching import Admission, Expired, MicroBatcher

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("overload") / "tiny")


class Gated:
    """The app with its engine held until `release()`; `batches` records each batch's size."""

    def __init__(self, tiny: Path, **config):
        # one inference lane: "the engine" is then one thread the gate can hold
        self.app = create_app(ServeConfig(model=str(tiny), max_wait_ms=1, lanes=1, **config))
        self.service = self.app.state.service
        self.gate = threading.Event()
        self.batches: list[int] = []
        run = self.service.batcher.run

        def held(batch: np.ndarray) -> np.ndarray:
            self.batches.append(len(batch))
            self.gate.wait(10)
            return run(batch)

        self.service.batcher.run = held

    def wait_depth(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.service.admission.depth != n:
            assert time.monotonic() < deadline, self.service.admission.depth
            time.sleep(0.01)

    def release(self) -> None:
        self.gate.set()


def _metric(text: str, name: str) -> float:
    return float(next(x.split()[-1] for x in text.splitlines() if x.startswith(name)))


def test_past_the_queue_503_with_retry_after_at_once(tiny):
    gated = Gated(tiny, max_queue=2)
    jpeg = CHELSEA.read_bytes()
    with TestClient(gated.app) as c, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(c.post, "/v1/predict", content=jpeg) for _ in range(2)]
        gated.wait_depth(2)
        full = c.get("/readyz")  # a full queue: not ready, before anything was shed
        assert full.status_code == 503 and "queue is full" in full.json()["error"]["message"]
        t = time.perf_counter()
        r = c.post("/v1/predict", content=jpeg)
        assert time.perf_counter() - t < 1.0  # refused at once, not queued
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        batch = c.post("/v1/predict/batch", files=[("files", ("a.jpg", jpeg))])
        assert batch.status_code == 503 and batch.headers["retry-after"] == "1"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert ready.headers["retry-after"] == "1"
        health = c.get("/healthz")
        assert health.status_code == 200
        text = c.get("/metrics").text
        assert _metric(text, 'imgrec_shed_total{reason="queue_full"}') == 2
        assert _metric(text, "imgrec_queue_depth") == 2
        gated.release()
        assert [f.result(10).status_code for f in held] == [200, 200]
        assert _metric(c.get("/metrics").text, "imgrec_queue_depth") == 0
        assert c.get("/readyz").status_code == 503  # shed within the last second


def test_readyz_recovers_a_second_after_the_last_shed(tiny, monkeypatch):
    import imgrec.serve.service as service_module

    monkeypatch.setattr(service_module, "SHED_NOT_READY_S", 0.3)
    gated = Gated(tiny, max_queue=1)
    gated.release()
    with TestClient(gated.app) as c:
        assert c.get("/readyz").status_code == 200
        gated.service.note_shed("queue_full")
        assert c.get("/readyz").status_code == 503
        time.sleep(0.35)
        assert c.get("/readyz").status_code == 200


def test_an_image_past_its_timeout_is_answered_503_not_served_late(tiny):
    """One image holds the engine; the next waits in the queue. Past --timeout-ms both are
    answered 503 `timed_out`, and the waiting one is never run."""
    gated = Gated(tiny, timeout_ms=300, max_batch=1)
    jpeg = CHELSEA.read_bytes()
    with TestClient(gated.app) as c, ThreadPoolExecutor(2) as pool:
        t = time.perf_counter()
        rs = [pool.submit(c.post, "/v1/predict", content=jpeg) for _ in range(2)]
        answers = [f.result(10) for f in rs]
        waited = time.perf_counter() - t
        gated.release()
        assert [r.status_code for r in answers] == [503, 503]
        assert {r.json()["error"]["code"] for r in answers} == {"timed_out"}
        assert all(r.headers["retry-after"] == "1" for r in answers)
        assert 0.3 <= waited < 3
        time.sleep(0.2)  # the engine finishes the held batch; the expired image is skipped
        assert gated.batches == [1]
        text = c.get("/metrics").text
        assert _metric(text, "imgrec_timed_out_total") == 2
        assert _metric(text, "imgrec_queue_depth") == 0
        assert c.post("/v1/predict", content=jpeg).status_code == 200


def test_a_batch_request_times_out_as_a_whole(tiny):
    gated = Gated(tiny, timeout_ms=200)
    with TestClient(gated.app) as c:
        jpeg = CHELSEA.read_bytes()
        r = c.post("/v1/predict/batch", files=[("files", ("a.jpg", jpeg)),
                                               ("files", ("b.jpg", jpeg))])
        gated.release()
    assert r.status_code == 503 and r.json()["error"]["code"] == "timed_out"


def test_a_batch_request_larger_than_the_queue_runs_when_alone(tiny):
    gated = Gated(tiny, max_queue=2)
    gated.release()
    jpeg = CHELSEA.read_bytes()
    with TestClient(gated.app) as c:
        r = c.post("/v1/predict/batch", files=[("files", (f"{i}.jpg", jpeg)) for i in range(5)])
    assert r.status_code == 200 and len(r.json()["results"]) == 5


def test_model_info_shows_the_queue_and_the_timeout(tiny):
    config = ServeConfig(model=str(tiny), max_batch=4, threads=1)
    with TestClient(create_app(config)) as c:
        info = c.get("/v1/model").json()
    # the batch running and half a batch waiting, at least QUEUE_IMAGES; an image per decode
    # thread
    assert info["max_queue"] == 24 + config.decode_threads and config.decode_threads >= 2
    assert ServeConfig(max_batch=32).queue_limit == 32 + 16 + config.decode_threads
    assert info["max_batch"] == ServeConfig().max_batch == 4
    assert info["timeout_ms"] == 10_000
    assert ServeConfig(max_queue=3).queue_limit == 3


# -- the pieces on their own -----------------------------------------------------------------
def test_admission_bounds_and_admits_an_oversized_request_alone():
    depths: list[int] = []
    a = Admission(3, depths.append)
    assert a.enter(2) and not a.enter(2) and a.enter(1) and a.full
    a.leave(3)
    assert a.enter(10)  # alone, a request larger than the limit is still admitted
    assert not a.enter(1)
    a.leave(10)
    assert depths == [2, 3, 0, 10, 0] and a.depth == 0
    with pytest.raises(ValueError):
        Admission(0)


def test_batcher_drops_images_past_their_deadline():
    gate = threading.Event()
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return np.zeros((len(x), 1), np.float32)

    batcher = MicroBatcher(run, max_batch=1, max_wait_ms=0, on_batch=lambda n, s: sizes.append(n))
    try:
        first = batcher.submit(np.ones((1, 2, 2), np.uint8))
        time.sleep(0.05)  # the first batch holds the engine
        late = batcher.submit(np.ones((1, 2, 2), np.uint8), deadline=time.monotonic() + 0.05)
        fine = batcher.submit(np.ones((1, 2, 2), np.uint8), deadline=time.monotonic() + 60)
        assert batcher.depth == 2
        time.sleep(0.1)
        gate.set()
        assert first.result(5) is not None and fine.result(5) is not None
        with pytest.raises(Expired):
            late.result(5)
    finally:
        batcher.close()
    assert sizes == [1, 1]


def test_healthz_answers_fast_while_the_queue_is_full(tiny):
    """Liveness never waits on the engine: with the queue full and the engine held, /healthz
    answers in milliseconds (the event loop is free)."""
    gated = Gated(tiny, max_queue=4)
    jpeg = CHELSEA.read_bytes()
    with TestClient(gated.app) as c, ThreadPoolExecutor(8) as pool:
        held = [pool.submit(c.post, "/v1/predict", content=jpeg) for _ in range(4)]
        gated.wait_depth(4)
        shed = [pool.submit(c.post, "/v1/predict", content=jpeg) for _ in range(4)]
        times = []
        for _ in range(20):
            t = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            times.append(time.perf_counter() - t)
        gated.release()
        assert [f.result(10).status_code for f in shed] == [503] * 4
        assert [f.result(10).status_code for f in held] == [200] * 4
    # not waiting on the held engine (that would be seconds); milliseconds when idle, but a
    # unit test on 2 busy cores asserts the bound, not the benchmark figure
    assert sorted(times)[len(times) // 2] < 0.5, times


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only")
def test_inference_threads_run_below_the_event_loop(tiny):
    """The batcher's thread and the threads ONNX Runtime starts run 5 nice steps below the
    rest, so under full load the event loop (/healthz, uploads, refusals) comes first."""
    def nice(tid: int) -> int:
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[16])

    before = {int(p.name) for p in Path("/proc/self/task").iterdir()}
    app = create_app(ServeConfig(model=str(tiny), threads=2))
    base = nice(threading.get_native_id())
    assert all(nice(t.native_id) == base + 5 for t in app.state.service.batcher._threads)
    new = {int(p.name) for p in Path("/proc/self/task").iterdir()} - before
    lowered = [t for t in new if nice(t) == base + 5]
    # two single-threaded lanes (the default for 2 threads), or a lane and ORT's pool
    assert len(lowered) >= 2, (base, {t: nice(t) for t in new})
    app.state.service.batcher.close()
