"""`imgrec predict --out ... --ray`: the same job on a local Ray (one Ray for the module, as
starting one takes seconds) gives the single-process run's rows: same order, same labels,
probabilities to 1e-5, the same error rows; and it resumes a local run's output."""

from __future__ import annotations

import json

import pytest
from helpers import trained_shapes

from imgrec import batch_predict
from imgrec.cli import main
from imgrec.predict import available_cores

ray = pytest.importorskip("ray", reason="Ray (imgrec[cluster]) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (imgrec[cluster]) is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; `--ray` finds it initialised and leaves it running."""
    from imgrec.cluster import connect

    started = connect(ray, None)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = trained_shapes(tmp_path_factory)
    root = tmp_path_factory.mktemp("ray-inputs") / "in"
    root.mkdir()
    for cls in ("disc", "square"):
        for src in sorted((base / "shapes" / cls).glob("*.png"))[:18]:
            (root / f"{cls}-{src.name}").write_bytes(src.read_bytes())
    (root / "m-broken.png").write_text("not an image")
    return str(base / "bundle"), str(root)


def _rows(out) -> list[dict]:
    return pq.read_table(out).to_pylist()


def test_ray_equals_local(local_ray, job, tmp_path, capsys):
    model, folder = job
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert main(["predict", folder, "--model", model, "--out", str(local)]) == 0
    assert main(["predict", folder, "--model", model, "--out", str(on_ray), "--ray"]) == 0
    assert "wrote 37 rows (1 unreadable)" in capsys.readouterr().out
    a, b = _rows(local), _rows(on_ray)
    assert [r["input"] for r in a] == [r["input"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["error"] for r in a] == [r["error"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        if ra["error"] is None:
            assert abs(ra["probability"] - rb["probability"]) <= 1e-5
            for pa, pb in zip(json.loads(ra["top_k"]), json.loads(rb["top_k"]), strict=True):
                assert pa["label"] == pb["label"]
                assert abs(pa["probability"] - pb["probability"]) <= 1e-5
    assert ray.cluster_resources().get("CPU") == available_cores()


def test_ray_resumes_a_local_run(local_ray, job, tmp_path, capsys, monkeypatch):
    """The progress record is the same whoever scored: an interrupted local run (here: cut
    after 2 of its chunks) is finished on Ray, every row once, in order."""
    model, folder = job
    monkeypatch.setattr(batch_predict, "CHUNK_ROWS", 10)
    out = tmp_path / "r.parquet"
    assert main(["predict", folder, "--model", model, "--out", str(out)]) == 0
    full = _rows(out)
    state = json.loads((out / "_progress.json").read_text())
    state.update(rows=20, parts=2, complete=False)
    digest = batch_predict.EMPTY_HASH
    for r in full[:20]:
        digest = batch_predict.chain_hash(digest, r["input"])
    state["inputs_sha256"] = digest
    (out / "_progress.json").write_text(json.dumps(state))  # as a kill after part 2 leaves it
    capsys.readouterr()
    assert main(["predict", folder, "--model", model, "--out", str(out), "--resume",
                 "--ray"]) == 0
    assert "resumed after 20 rows: wrote 17 rows" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["input"] for r in rows] == [r["input"] for r in full]
    assert [r["label"] for r in rows] == [r["label"] for r in full]


def test_an_address_nobody_answers_at_is_one_line_not_a_hang():
    """`predict --ray 127.0.0.1:9151` with no cluster there: ray.init retried for ever (8 min
    50 s until a timeout ended it), logging a line every few seconds."""
    import socket
    import time

    from imgrec.cluster import check_reachable, connect
    from imgrec.errors import InputError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class NoRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise AssertionError("ray.init must not be reached")

    t = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match="nothing answers there"):
            connect(NoRay, address)
    assert time.monotonic() - t < 10
    with pytest.raises(InputError, match="not a port number"):
        check_reachable("127.0.0.1:http")
    with socket.socket() as s:  # a listening address passes
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    check_reachable("auto")
