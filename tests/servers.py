"""A real `imgrec serve` in a subprocess whose import hook refuses torch: the proof that the
serve path is torch-free, shared by the serve and end-to-end matrix tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

NO_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                print("TORCH-IMPORT-ATTEMPT", name, file=sys.stderr, flush=True)
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    from imgrec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll /healthz until it answers 200; fail with the server's stderr if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


class Served:
    """A running server: its base URL and, once stopped, its output and exit status."""

    def __init__(self, base: str, proc: subprocess.Popen):
        self.base, self.proc = base, proc
        self.out = self.err = ""

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.out, self.err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()


@contextlib.contextmanager
def serve_without_torch(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`imgrec serve ARGS --port P` with torch unimportable; asserts afterwards that nothing
    tried to import it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "serve", *args, "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})})
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        wait_healthy(served.base, proc)
        yield served
    finally:
        if proc.returncode is None:
            served.stop()
    assert "TORCH-IMPORT-ATTEMPT" not in served.err, served.err


@contextlib.contextmanager
def serve_in_thread(config, app=None, **uvicorn_options) -> Iterator[str]:
    """`create_app(config)` (or `app`, the studio's) on uvicorn in a thread on a free loopback
    port (the in-process server of the browser, auth and slow-client tests); stopped at the
    end."""
    import threading

    import uvicorn

    from imgrec.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app or create_app(config), host="127.0.0.1", port=port,
                                           log_level="warning", **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)

