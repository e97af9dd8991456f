"""Serving replicas: `imgrec serve --workers N` behind one address counts every request once
in /metrics whichever worker answers the scrape (prometheus_client's multiprocess mode), and
the Kubernetes manifest in deploy/ stays consistent (labels, ports, probes, scale target)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml
from bundles import make_tiny_bundle
from servers import ROOT, serve_without_torch

CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
MANIFEST = ROOT / "deploy" / "kubernetes.yaml"
REQUESTS = 24


def _predict_count(metrics_text: str) -> float:
    """imgrec_requests_total summed over the /v1/predict series with status 200."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("imgrec_requests_total{") and 'endpoint="/v1/predict"' in line \
                and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_two_workers_count_every_request_once(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "tiny")
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    body = CHELSEA.read_bytes()
    with serve_without_torch(str(bundle), "--workers", "2",
                             env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}) as served:
        for _ in range(REQUESTS):  # a new connection each: the kernel spreads them over workers
            with httpx.Client(base_url=served.base, timeout=30) as client:
                r = client.post("/v1/predict", files={"file": ("cat.jpg", body)})
                assert r.status_code == 200, r.text
        scrapes = []
        for _ in range(6):
            with httpx.Client(base_url=served.base, timeout=30) as client:
                scrapes.append(_predict_count(client.get("/metrics").text))
        writers = {re.search(r"_(\d+)\.db$", p.name).group(1)
                   for p in metrics_dir.glob("counter_*.db")}
    assert scrapes == [REQUESTS] * 6, scrapes
    assert len(writers) == 2, f"both workers should record metrics, saw pids {writers}"


def _documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_kubernetes_manifest_is_consistent():
    docs = _documents()
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    command = container["command"]
    assert command[:2] == ["imgrec", "serve"]
    port = command[command.index("--port") + 1]
    assert int(port) == ports["http"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in ports, probe
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > 30  # longer than the server's own 30 s graceful shutdown


def test_the_manifest_serves_only_options_serve_accepts():
    """Every --flag in the manifest's command is one `imgrec serve` knows."""
    from typer.main import get_command

    from imgrec.cli import app

    serve = get_command(app).commands["serve"]
    known = {opt for p in serve.params for opt in p.opts}
    (container,) = _documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    flags = [a for a in container["command"] if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known


def test_deploy_docs_include_the_manifest():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/kubernetes.yaml" in text and "HorizontalPodAutoscaler" in text
    assert Path(MANIFEST).is_file()


def test_workers_serve_the_bundle_as_it_was_when_the_server_started(tmp_path, monkeypatch):
    """A worker restarted after its bundle was retrained loaded the new model while the other
    served the old one (two models behind one address, both named alike). Workers now load a
    pinned copy of the bundle's files, made at start and removed at the end."""
    import json
    import os

    import uvicorn

    from imgrec.bundle import atomic_write_bytes, read_bundle
    from imgrec.serve import launch
    from imgrec.serve.config import CONFIG_ENV, ServeConfig

    bundle = make_tiny_bundle(tmp_path / "shapes")
    before = (bundle / "model.onnx").read_bytes()
    name = read_bundle(bundle, need_weights=False).name
    seen = {}

    def run(app, **kwargs):
        pinned = json.loads(os.environ[CONFIG_ENV])["model"]
        seen["pinned"] = pinned
        atomic_write_bytes(bundle / "model.onnx", b"retrained")  # a retraining, meanwhile
        seen["bytes"] = (Path(pinned) / "model.onnx").read_bytes()
        seen["name"] = read_bundle(pinned, need_weights=False).name

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setenv(CONFIG_ENV, "")  # restored afterwards: run_server sets it
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    launch.run_server(ServeConfig(model=str(bundle), workers=2), "127.0.0.1", 0, "warning")
    assert Path(seen["pinned"]) != bundle and Path(seen["pinned"]).name == bundle.name
    assert seen["bytes"] == before and seen["name"] == name
    assert not Path(seen["pinned"]).exists()  # removed when the server stops
    assert not (Path(seen["pinned"]) / "model.safetensors").exists()
    # the metrics folder it made is gone, and so is its name from the environment (the
    # next server started from this process wrote into the removed folder and crashed)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
