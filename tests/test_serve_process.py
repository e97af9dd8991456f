"""`imgrec serve` as a process: SIGTERM answers what is in flight and exits 0, the first serve
of a bundle without model.onnx exports it in a child process (the server never imports
torch), a port in use is one line and exit 2, a public address without a key one warning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from bundles import make_tiny_bundle
from servers import NO_TORCH, ROOT, free_port, serve_without_torch, wait_healthy

from imgrec.cli import main
from imgrec.serve.app import CONFIG_ENV, ServeConfig

CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("process") / "tiny")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_sigterm_answers_the_request_in_flight_and_exits_0(tiny):
    """A request held 1 s in the micro-batcher (a 1000 ms batching window) when SIGTERM
    arrives still gets its 200, and the process exits 0 (uvicorn alone re-raised the signal:
    the process died of it, status -15)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "serve", str(tiny), "--port", str(port),
         "--max-wait-ms", "1000", "--max-batch", "64", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        answer: dict = {}

        def slow() -> None:
            t = time.perf_counter()
            answer["r"] = httpx.post(f"{base}/v1/predict", content=CHELSEA.read_bytes(),
                                     timeout=30)
            answer["s"] = time.perf_counter() - t

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.4)  # the request is in the batcher, waiting out its window
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["predictions"]
    assert answer["s"] > 0.5  # it really was in flight when the signal came
    assert proc.returncode == 0, err
    assert "TORCH-IMPORT-ATTEMPT" not in err


def test_first_serve_exports_in_a_child_and_never_imports_torch(tmp_path):
    """A bundle without model.onnx: `imgrec serve` (torch unimportable in the server
    process) exports it in a child process and serves it with ONNX Runtime, in a process that
    stays small. Before, serve exported in its own process: the import hook caught torch."""
    bundle = make_tiny_bundle(tmp_path / "fresh", export=False)
    assert not (bundle / "model.onnx").exists()
    with serve_without_torch(str(bundle)) as served:
        assert (bundle / "model.onnx").is_file()
        info = httpx.get(f"{served.base}/v1/model", timeout=10).json()
        assert info["engine"] == "onnxruntime"
        r = httpx.post(f"{served.base}/v1/predict", content=CHELSEA.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        maps = Path(f"/proc/{served.proc.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert _rss_mb(served.proc.pid) < 400  # torch alone would be over a gigabyte
    assert served.proc.returncode == 0, served.err


def test_a_port_in_use_is_one_line_and_exit_2(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "imgrec.cli", "serve", str(tiny), "--port",
                              str(port)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"imgrec: error: port {port} is in use")
    assert "--port" in lines[0]
    assert "Uvicorn" not in run.stdout + run.stderr


@pytest.fixture
def no_uvicorn(monkeypatch):
    """`imgrec serve` up to uvicorn.run, which only records its arguments."""
    import uvicorn

    started: dict = {}
    monkeypatch.setenv(CONFIG_ENV, "")  # serve writes it; undone after the test
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.update(k))
    return started


def test_a_public_address_without_a_key_warns_once(tiny, no_uvicorn, capsys, monkeypatch):
    monkeypatch.delenv("IMGREC_API_KEY", raising=False)
    assert main(["serve", str(tiny), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: warning: listening on 0.0.0.0"), err
    assert "--api-key" in err[0]
    # with a key, or on loopback: no warning
    assert main(["serve", str(tiny), "--host", "0.0.0.0", "--port", "0", "--api-key", "k"]) == 0
    assert main(["serve", str(tiny), "--host", "127.0.0.1", "--port", "0"]) == 0
    assert capsys.readouterr().err == ""


def test_serve_flags_reach_the_config_and_uvicorn(tiny, tmp_path, no_uvicorn, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team's keys\nalpha\n\n  beta  \n")
    monkeypatch.setenv("IMGREC_API_KEY", "gamma")
    assert main(["serve", str(tiny), "--port", "0", "--max-queue", "7", "--timeout-ms", "250",
                 "--body-timeout", "4", "--upload-buffer-mb", "20", "--max-connections", "99",
                 "--api-key-file", str(keys), "--cors-origin", "https://a.example",
                 "--cors-origin", "https://b.example"]) == 0
    config = ServeConfig.from_env()
    assert (config.max_queue, config.timeout_ms, config.body_timeout_s) == (7, 250, 4)
    assert config.upload_buffer_mb == 20 and config.max_connections == 99
    assert config.api_keys == ["gamma", "alpha", "beta"]
    assert config.cors_origins == ["https://a.example", "https://b.example"]
    assert no_uvicorn["limit_concurrency"] == 99
    assert "gamma" not in repr(config)  # keys stay out of logs


def test_default_connection_limit_follows_the_descriptor_limit(tiny, no_uvicorn):
    import resource

    assert main(["serve", str(tiny), "--port", "0"]) == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # raised towards 65536 by serve
    assert soft == min(65536, hard) or hard == resource.RLIM_INFINITY
    assert no_uvicorn["limit_concurrency"] == max(64, soft - 128)
    assert no_uvicorn["timeout_graceful_shutdown"] == 30


def test_a_bad_key_file_is_one_line(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["serve", str(tiny), "--port", "0", "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert main(["serve", str(tiny), "--port", "0", "--api-key", "two words"]) == 2
    assert "one word" in capsys.readouterr().err


def test_an_export_that_fails_in_the_child_falls_back_to_pytorch(tmp_path, no_uvicorn,
                                                                 monkeypatch, capsys):
    """The child's `cannot export` error becomes the one warning line of before, and the
    bundle is served with PyTorch; any other failure of the child is serve's error."""
    import imgrec.cli as cli

    bundle = make_tiny_bundle(tmp_path / "b", export=False)
    seen: list[list[str]] = []

    def child(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, "", "imgrec: error: cannot export this "
                                           "network to ONNX (RuntimeError: Unsupported)\n")

    monkeypatch.setattr(subprocess, "run", child)
    monkeypatch.setattr(cli.sys, "modules", {k: v for k, v in sys.modules.items()
                                             if k != "torch"})  # as in a fresh CLI process
    assert main(["serve", str(bundle), "--port", "0"]) == 0
    assert seen and seen[0][-3:] == ["imgrec.cli", "export", str(bundle)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: warning: cannot export"), err
    assert ServeConfig.from_env().torch_fallback

    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 2, "", "imgrec: error: the bundle is broken\n"))
    assert main(["serve", str(bundle), "--port", "0"]) == 2
    assert "exporting it failed: the bundle is broken" in capsys.readouterr().err


def test_serve_does_not_leak_the_key_into_the_banner(tiny, no_uvicorn, capsys):
    assert main(["serve", str(tiny), "--port", "0", "--api-key", "s3cret"]) == 0
    out = capsys.readouterr()
    assert "API key required" in out.out
    assert "s3cret" not in out.out + out.err
    assert os.environ[CONFIG_ENV]  # the workers' config (it carries the key to them)


def test_a_pretrained_model_not_yet_cached_is_exported_in_the_child(tmp_path, monkeypatch):
    """`imgrec serve` (imagenet) on a fresh machine: building the cached bundle needs torch,
    so serve must not open it itself but leave it to the child's export."""
    import imgrec.cli as cli
    import imgrec.zoo as zoo

    monkeypatch.setenv("IMGREC_MODELS", str(tmp_path / "models"))

    def no(*args, **kwargs):
        raise AssertionError("the server process opened (built) the pretrained bundle")

    monkeypatch.setattr(zoo, "open_bundle", no)
    assert cli._needs_export(None) and cli._needs_export("imagenet")
    cached = tmp_path / "models" / "efficientnet_lite0"
    cached.mkdir(parents=True)
    (cached / "imgrec.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"")
    assert cli._needs_export("imagenet")  # weights but no ONNX file yet


@pytest.mark.parametrize("int8", ["", "1"])
def test_the_docker_image_serves_int8_when_built_with_int8(tmp_path, int8):
    """The Dockerfile's run stage: its CMD, run by sh as Docker runs it, passes --int8
    exactly when the image was built with --build-arg INT8=1 (an ARG stage 1 alone saw, so
    the image served float32)."""
    import json
    import re
    import subprocess

    text = (Path(__file__).parents[1] / "Dockerfile").read_text()
    run_stage = text.split("\nFROM ")[-1]
    assert re.search(r"^ARG INT8=", run_stage, re.M) and "INT8=$INT8" in run_stage
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", run_stage, re.M).group(1))
    fake = tmp_path / "bin" / "imgrec"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "PORT": "8000", "WORKERS": "1",
           "INT8": int8}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["serve", "/bundle", "--host", "0.0.0.0", "--port", "8000",
                           "--workers", "1"] + (["--int8"] if int8 else [])


@pytest.mark.parametrize("option", ["--max-upload-mb", "--upload-buffer-mb", "--timeout-ms",
                                    "--body-timeout"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_infinite_limits_are_refused_before_the_banner(option, value, capsys):
    """--max-upload-mb inf printed the 'serving' banner, then died converting infinity."""
    from imgrec.cli import main

    assert main(["serve", option, value, "--port", "0"]) == 2
    out = capsys.readouterr()
    assert "serving" not in out.out + out.err and option in out.err
