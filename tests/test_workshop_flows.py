"""The workshop flows beyond the matrix: a PaaS starting the Procfile with $PORT, a network
that ONNX cannot express (export says so in one line; serve falls back to PyTorch)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from bundles import make_tiny_bundle
from fastapi.testclient import TestClient
from servers import ROOT, free_port, wait_healthy

from imgrec.cli import main
from imgrec.serve.app import CONFIG_ENV, ServeConfig, create_app

CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("flows") / "tiny")


def test_procfile_starts_the_app_on_port(tiny):
    """As a PaaS does: the `web:` line run by a shell with $PORT (and the model) set."""
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    port = free_port()
    env = {**os.environ, "PORT": str(port), "IMGREC_MODEL": str(tiny),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", "-c", f"exec {line.removeprefix('web:').strip()}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        r = httpx.post(f"{base}/v1/predict", content=CHELSEA.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-shapes"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), err


@pytest.fixture
def unexportable(monkeypatch):
    """torch.onnx.export failing the way the TorchScript exporter does: with a graph dump."""
    import torch

    def fail(*args, **kwargs):
        graph = "\n".join(f"  %{i} : Float(1, 16, 7, 7) = aten::something(%{i - 1})"
                          for i in range(1, 55))
        raise RuntimeError(f"Unsupported: ONNX export of operator adaptive_max_pool2d\n{graph}")

    monkeypatch.setattr(torch.onnx, "export", fail)


def test_export_failure_is_one_line(tmp_path, unexportable, capsys):
    bundle = make_tiny_bundle(tmp_path / "b", export=False)
    assert main(["export", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.match(r"imgrec: error: cannot export this network to ONNX \(RuntimeError: "
                    r"Unsupported: ONNX export of operator adaptive_max_pool2d\)$", err[0])
    assert not (bundle / "model.onnx").exists()


def test_serve_falls_back_to_pytorch_with_one_warning(tmp_path, unexportable, capsys,
                                                      monkeypatch):
    import uvicorn

    bundle = make_tiny_bundle(tmp_path / "b", export=False)
    started = {}
    monkeypatch.setenv(CONFIG_ENV, "")  # serve writes it; undone after the test
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.update(k))
    assert main(["serve", str(bundle), "--port", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: warning: cannot export"), err
    assert "serving it with PyTorch" in err[0]
    config = ServeConfig.from_env()
    assert config.torch_fallback and started
    with TestClient(create_app(config)) as client:
        assert client.get("/v1/model").json()["engine"] == "pytorch"
        r = client.post("/v1/predict", content=CHELSEA.read_bytes())
        assert r.status_code == 200, r.text
    # predict needs no export at all: without model.onnx it runs the network in PyTorch
    assert main(["predict", str(CHELSEA), "--model", str(bundle), "--json"]) == 0


def test_a_plain_deployment_never_falls_back(tiny, tmp_path):
    """Without the CLI's go-ahead (a Procfile or Docker start on a bundle with no ONNX file),
    the server refuses to start and says how to fix it, instead of importing torch."""
    from imgrec.errors import BundleError

    bundle = make_tiny_bundle(tmp_path / "b", export=False)
    with pytest.raises(BundleError, match="imgrec export"):
        create_app(ServeConfig(model=str(bundle)))
