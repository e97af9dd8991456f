"""Slow clients cannot hold the server: a body that does not arrive within --body-timeout is
answered 408 JSON and the connection closed; the bodies held at once stay under a byte budget
(503 past it) that trickling connections barely touch; and /healthz and normal requests keep
being answered while hundreds of slow uploads are open. A real uvicorn on loopback, raw
sockets for the slow clients."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest
from bundles import make_tiny_bundle
from servers import serve_in_thread

from imgrec.serve.app import ServeConfig
from imgrec.serve.middleware import UploadLimit

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("slow") / "tiny")


def serving(config: ServeConfig, **uvicorn_options):
    """uvicorn in a thread on a free loopback port, as `imgrec serve` configures it."""
    return serve_in_thread(config, **uvicorn_options)


def _slow_upload(base: str, announced: int = 1000, path: str = "/v1/predict") -> socket.socket:
    """A connection that sent its headers and three bytes of an `announced`-byte body."""
    port = int(base.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
              f"Content-Length: {announced}\r\n\r\n".encode() + b"\xff\xd8\xff")
    return s


def _response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response until the server closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(x.lower().split(": ", 1) for x in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_body_slower_than_the_timeout_gets_408_json_and_is_closed(tiny):
    config = ServeConfig(model=str(tiny), body_timeout_s=0.5)
    with serving(config) as base:
        s = _slow_upload(base)
        t = time.perf_counter()
        status, headers, body = _response(s)  # returns: the server closed the connection
        s.close()
        waited = time.perf_counter() - t
        assert status == 408, body
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert 0.4 < waited < 5
        # a multipart form that stalls mid-file gets the same
        boundary = "b0undary"
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as m:
            m.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-"
                      f"data; boundary={boundary}\r\nContent-Length: 5000\r\n\r\n--{boundary}"
                      "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\""
                      "\r\n\r\n".encode())
            status, _, body = _response(m)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        metrics = httpx.get(f"{base}/metrics").text
        assert 'imgrec_errors_total{code="request_timeout"} 2.0' in metrics


def test_a_full_upload_buffer_refuses_with_503_and_retry_after(tiny):
    """Two uploads may hold 1 MB together: a third, arriving while they trickle, is refused;
    trickling connections hold only what they sent, so they never starve a normal upload."""
    config = ServeConfig(model=str(tiny), body_timeout_s=5, upload_buffer_mb=0.25)
    jpeg = CHELSEA.read_bytes()
    with serving(config) as base:
        port = int(base.rsplit(":", 1)[1])
        hogs = []
        for _ in range(2):  # each sends 120 kB of a 200 kB body, then stalls
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
                      + b"\xff" * 120_000)
            hogs.append(s)
        time.sleep(0.3)
        r = httpx.post(f"{base}/v1/predict", content=jpeg, timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
        for s in hogs:
            s.close()
        time.sleep(0.3)
        assert httpx.post(f"{base}/v1/predict", content=jpeg, timeout=10).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'imgrec_shed_total{reason="upload_buffer_full"} 1.0' in metrics


def test_healthz_and_normal_requests_are_answered_among_300_slow_uploads(tiny):
    """300 connections trickling their bodies: /healthz answers in milliseconds, a normal
    upload gets its 200, and every slow one gets its 408 once its time is up."""
    config = ServeConfig(model=str(tiny), body_timeout_s=3)
    jpeg = CHELSEA.read_bytes()
    with serving(config, limit_concurrency=1000) as base:
        slow = [_slow_upload(base) for _ in range(300)]
        time.sleep(0.3)
        with httpx.Client(base_url=base, timeout=10) as client:
            times = []
            for _ in range(10):
                t = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                times.append(time.perf_counter() - t)
            assert client.post("/v1/predict", content=jpeg).status_code == 200
        # answered, not held (before: no answer at all); its latency under load is
        # benchmarks/overload.py's figure, not a timed unit test (2 busy cores)
        assert max(times) < 2.0, times
        statuses = []
        for s in slow:
            statuses.append(_response(s)[0])
            s.close()
    assert statuses == [408] * 300


def test_the_budget_counts_bytes_as_they_arrive_and_gives_them_back():
    """The middleware on its own: a request's bytes are held while it runs, given back when
    it is answered; a request alone is never refused by the budget."""
    seen = {}

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        seen["held"] = limit.buffered
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = UploadLimit(app, max_bytes=10_000, buffer_bytes=100)
    chunks = [{"type": "http.request", "body": b"x" * 150, "more_body": True},
              {"type": "http.request", "body": b"y" * 50, "more_body": False}]

    async def receive():
        return chunks.pop(0)

    async def send(msg):
        pass

    scope = {"type": "http", "method": "POST", "headers": [], "path": "/v1/predict"}
    anyio.run(limit, scope, receive, send)
    assert seen["held"] == 200 and limit.buffered == 0  # alone: admitted past the budget
