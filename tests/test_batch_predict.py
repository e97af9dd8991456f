"""`imgrec predict --out`: rows in input order with --json's fields in jsonl, csv and parquet,
unreadable files as error rows, --resume after a kill -9 with no duplicate or missing row,
refusals in one line, and the lazy pieces (folder walk, bounded lanes) it streams with."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import trained_shapes, truncated_jpeg

from imgrec import batch_predict
from imgrec.cli import main
from imgrec.images import is_image_path
from imgrec.predict import in_lanes, walk_images

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (imgrec[batch]) is not installed")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The shapes bundle and a folder of its PNGs (two subfolders) plus two unreadable files."""
    base = trained_shapes(tmp_path_factory)
    root = tmp_path_factory.mktemp("batch-inputs") / "in"
    for cls in ("disc", "square"):
        (root / cls).mkdir(parents=True)
        for src in sorted((base / "shapes" / cls).glob("*.png"))[:20]:
            (root / cls / src.name).write_bytes(src.read_bytes())
    (root / "disc" / "broken.png").write_text("not an image")
    truncated_jpeg(root / "square" / "cut.jpg")
    return str(base / "bundle"), str(root)


def _json_records(job, capsys, *extra) -> list[dict]:
    model, folder = job
    assert main(["predict", folder, "--model", model, "--json", "--top-k", "2", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _read(out: Path) -> list[dict]:
    """Rows of any format, as flat dicts (csv's empty cells as None)."""
    if out.suffix == ".jsonl":
        return [batch_predict.flat_row(json.loads(line)) for line in out.open()]
    if out.suffix == ".csv":
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r.update({k: (v or None) for k, v in r.items()})
            if r["label"] is not None:
                r["index"], r["probability"] = int(r["index"]), float(r["probability"])
        return rows
    return pq.read_table(out).to_pylist()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_rows_match_json_in_order(job, tmp_path, capsys, monkeypatch, suffix):
    monkeypatch.setattr(batch_predict, "CHUNK_ROWS", 7)  # several commits, a partial last one
    monkeypatch.setattr(batch_predict, "BATCH", 2)  # rows committed while inputs are listed
    expected = _json_records(job, capsys)
    out = tmp_path / f"results{suffix}"
    model, folder = job
    assert main(["predict", folder, "--model", model, "--top-k", "2", "--out", str(out)]) == 0
    assert f"wrote {len(expected)} rows (2 unreadable)" in capsys.readouterr().out
    if suffix == ".jsonl":  # exactly --json's records, one a line
        assert [json.loads(line) for line in out.open()] == expected
    rows = _read(out)
    assert [r["input"] for r in rows] == [r["input"] for r in expected]
    for row, rec in zip(rows, expected, strict=True):
        assert row == batch_predict.flat_row(rec)
        if "error" in rec:
            assert row["label"] is None and row["error"]
        else:
            assert json.loads(row["top_k"]) == rec["predictions"]
    errors = {Path(r["input"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.png", "cut.jpg"}


def test_existing_output_needs_resume_or_overwrite(job, tmp_path, capsys):
    model, folder = job
    out = str(tmp_path / "r.csv")
    args = ["predict", folder, "--model", model, "--out", out]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--resume" in err[0]
    assert main([*args, "--resume"]) == 0  # complete already: nothing redone
    assert "wrote 0 rows" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert len(_read(Path(out))) == 42


@pytest.mark.parametrize("change, message", [
    (["--top-k", "3"], "another --top-k"),
    (["--engine", "torch"], "another engine"),
    (["EXTRA"], "other inputs"),
])
def test_resume_refuses_another_job(job, tmp_path, capsys, change, message):
    model, folder = job
    out = str(tmp_path / "r.jsonl")
    assert main(["predict", folder, "--model", model, "--out", out]) == 0
    extra = [folder + "/disc"] if change == ["EXTRA"] else change
    capsys.readouterr()
    assert main(["predict", folder, "--model", model, "--out", out, "--resume", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_resume_refuses_changed_inputs(job, tmp_path, capsys, monkeypatch):
    """A file added before the rows already written would shift every row after it."""
    monkeypatch.setattr(batch_predict, "CHUNK_ROWS", 5)
    model, folder = job
    copy = tmp_path / "in"
    copy.mkdir()
    for p in sorted(Path(folder, "square").glob("*.png"))[:12]:
        (copy / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(copy), "--model", model, "--out", str(out)]) == 0
    (copy / "a_first.png").write_bytes(next(copy.glob("*.png")).read_bytes())
    capsys.readouterr()
    assert main(["predict", str(copy), "--model", model, "--out", str(out), "--resume"]) == 2
    assert "not the ones" in capsys.readouterr().err


def test_bad_options_are_one_line(job, tmp_path, capsys):
    model, folder = job
    for args, message in (
        (["--out", str(tmp_path / "r.txt")], "unknown format"),
        (["--resume"], "go with --out"),
        (["--out", str(tmp_path / "r.csv"), "--resume", "--overwrite"], "give one of them"),
        (["--out", str(tmp_path / "no" / "r.csv")], "does not exist"),
    ):
        assert main(["predict", folder, "--model", model, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "r.csv").exists()


def test_ray_missing_is_one_line(job, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    model, folder = job
    out = tmp_path / "r.parquet"
    assert main(["predict", folder, "--model", model, "--out", str(out), "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "install 'imgrec[cluster]'" in err[0]
    assert not out.exists()


_SLOW_CHILD = textwrap.dedent("""
    import sys, time
    from imgrec import batch_predict
    from imgrec.cli import main
    batch_predict.CHUNK_ROWS = 4
    write = batch_predict.Sink.commit
    def slow(self, *a, **k):  # a chunk every 0.15 s: the parent kills it mid-run
        write(self, *a, **k)
        time.sleep(0.15)
    batch_predict.Sink.commit = slow
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_resume_after_kill_9(job, tmp_path, capsys, monkeypatch, suffix):
    model, folder = job
    out = tmp_path / f"r{suffix}"
    progress = (out / "_progress.json" if suffix == ".parquet"
                else out.with_name(out.name + ".progress.json"))
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, "predict", folder, "--model",
                              model, "--top-k", "2", "--out", str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("rows", 0) >= 12:
            break
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = json.loads(progress.read_text())
    assert 12 <= state["rows"] < 42 and not state["complete"]
    if suffix == ".jsonl":  # a torn last line, as a kill in the middle of a write leaves
        with out.open("a") as f:
            f.write('{"input": "half a rec')
    monkeypatch.setattr(batch_predict, "CHUNK_ROWS", 4)
    assert main(["predict", folder, "--model", model, "--top-k", "2", "--out", str(out),
                 "--resume"]) == 0
    assert f"resumed after {state['rows']} rows" in capsys.readouterr().out
    expected = _json_records(job, capsys)
    assert _read(out) == [batch_predict.flat_row(r) for r in expected]  # none twice, none lost


def test_walk_is_sorted_like_rglob(tmp_path):
    for rel in ("b/x.jpg", "a.jpg", "a/z.png", "a b/y.png", "A/q.jpg", "a/b/c.jpg",
                "a-b.png", "notes.txt", "é.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rglob = sorted(p for p in tmp_path.rglob("*") if p.is_file() and is_image_path(p))
    assert list(walk_images(tmp_path)) == rglob
    for hidden in (".git/objects/photo.jpg", "a/._z.png", "__MACOSX/a/._z.png"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)  # left out, as train does
        (tmp_path / hidden).write_bytes(b"x")
    assert list(walk_images(tmp_path)) == rglob


def test_walk_follows_symlinked_folders_but_not_loops(tmp_path):
    """A symlinked folder is walked, as train and doctor follow a symlinked class folder; a
    link back into the folders being walked (a loop) is not."""
    elsewhere, top = tmp_path / "elsewhere", tmp_path / "photos"
    for rel in ("cats/a.jpg", "cats/deeper/b.png"):
        (elsewhere / rel).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / rel).write_bytes(b"x")
    (top / "dogs").mkdir(parents=True)
    (top / "dogs" / "c.jpg").write_bytes(b"x")
    (top / "cats").symlink_to(elsewhere / "cats")
    (top / "dogs" / "up").symlink_to(top)  # a loop
    (elsewhere / "cats" / "deeper" / "back").symlink_to(elsewhere / "cats")  # a loop too
    (top / "dogs" / "parent").symlink_to(tmp_path)  # above the folder asked for: not walked
    got = [p.relative_to(top).as_posix() for p in walk_images(top)]
    assert got == ["cats/a.jpg", "cats/deeper/b.png", "dogs/c.jpg"]


def test_in_lanes_reads_chunks_lazily():
    """A few chunks in flight, not the whole stream: memory stays flat for millions."""
    pulled = []

    def chunks():
        for i in range(1000):
            pulled.append(i)
            yield [i]

    results = in_lanes(["lane0", "lane1"], lambda lane, c: c[0] * 2, chunks())
    assert [next(results) for _ in range(3)] == [0, 2, 4]
    assert len(pulled) <= 3 + 4  # at most `ahead` (2 per lane) beyond those taken
    assert list(results) == [2 * i for i in range(3, 1000)]


def test_failed_start_leaves_no_output(job, tmp_path, capsys):
    """A folder without images fails in one line and leaves no output to trip a rerun."""
    model, _ = job
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.parquet"
    assert main(["predict", str(tmp_path / "empty"), "--model", model, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image files" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("given, expected", [
    (["predict", "d", "--out", "r.parquet", "--ray"],
     ["predict", "d", "--out", "r.parquet", "--ray"]),
    (["predict", "d", "--ray", "auto", "--out", "r.parquet"],
     ["predict", "d", "--ray", "--ray-address", "auto", "--out", "r.parquet"]),
    (["predict", "--ray", "10.0.0.5:6379", "d"],
     ["predict", "--ray", "--ray-address", "10.0.0.5:6379", "d"]),
    (["predict", "--ray", "ray://head:10001", "d"],
     ["predict", "--ray", "--ray-address", "ray://head:10001", "d"]),
    (["predict", "--ray", "photos/", "--out", "r.jsonl"],  # a path stays an input
     ["predict", "--ray", "photos/", "--out", "r.jsonl"]),
    (["train", "--ray", "auto"], ["train", "--ray", "auto"]),  # only predict has --ray
])
def test_ray_takes_an_optional_address(given, expected):
    from imgrec.cli import ray_address_form

    assert ray_address_form(given) == expected
