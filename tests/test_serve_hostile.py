"""The hostile image corpus (tests/test_hostile_images.py, 60+ kinds) posted to a real
`imgrec serve` process with an ImageNet-style contract (short side 256, bicubic, crop 224):
no 5xx, each answered in under 2 s, /healthz 200 after each, and the server's peak memory
under 1 GB."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from servers import serve_without_torch
from test_hostile_images import CORPUS, corpus_bytes

pytestmark = pytest.mark.slow

ANSWER_S = 2.0
PEAK_MB = 1024


def _imagenet_style_bundle(path: Path) -> Path:
    """A small network behind the ImageNet contract: the decoding work of a real one."""
    import torch

    from imgrec.bundle import Bundle
    from imgrec.export import export_bundle
    from imgrec.models import build_model
    from imgrec.models.pretrained import lite_preprocess
    from imgrec.network import save_bundle

    torch.manual_seed(0)
    args = {"in_channels": 3, "num_classes": 2, "image_size": 224, "width": 4}
    net = build_model("fast-cnn", **args).eval()
    save_bundle(Bundle(path, {"name": "fast-cnn", "args": args}, ["a", "b"],
                       lite_preprocess("efficientnet_lite0")), net)
    export_bundle(path)
    return path


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_hostile_corpus_against_the_server(tmp_path):
    bundle = _imagenet_style_bundle(tmp_path / "b")
    answers, slow, slowest = {}, {}, 0.0
    with serve_without_torch(str(bundle), "--workers", "1") as served, \
            httpx.Client(base_url=served.base, timeout=30) as client:
        for kind in CORPUS:
            t = time.perf_counter()
            r = client.post("/v1/predict", files={"file": ("upload", corpus_bytes(kind))})
            took = time.perf_counter() - t
            answers[kind], slowest = r.status_code, max(slowest, took)
            assert r.headers["content-type"].startswith("application/json"), kind
            if took >= ANSWER_S:
                slow[kind] = round(took, 2)
            assert client.get("/healthz").status_code == 200, f"after {kind}"
        peak = _peak_mb(served.proc.pid)
    counts = {s: list(answers.values()).count(s) for s in sorted(set(answers.values()))}
    print(f"\nhostile corpus: {len(answers)} kinds, answers {counts}, slowest {slowest:.2f} s, "
          f"server peak {peak:.0f} MB")
    assert not [k for k, s in answers.items() if s >= 500], answers
    assert set(answers.values()) <= {200, 400, 413, 415, 422}, answers  # 400: zero bytes
    assert not slow, slow
    assert peak < PEAK_MB, f"server peak {peak:.0f} MB"
    assert len(answers) >= 30
