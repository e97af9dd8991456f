"""Where imgrec writes, made safe (issue 11): outputs checked before the work, a lock so two
runs never share an --out, a failed run leaving nothing behind, SIGTERM exiting 143, and
evaluate never writing into the bundle it reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgrec.cli import main
from imgrec.files import LOCK_FILE, FolderLock

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "fast-cnn", "--image-size", "32", "--batch-size", "16", "--workers", "0",
        "--augment", "none", "--no-tensorboard", "-q"]


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgrec: error: "), captured.err
    return lines[0]


def test_second_run_on_a_locked_out_exits_2_naming_the_holder(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out).acquire()  # a run in progress
    try:
        line = _one_error_line(capsys, main(["train", str(shapes), "--out", str(out),
                                             "--epochs", "1", *FAST]))
    finally:
        lock.release()
    assert "in use by another imgrec run" in line and f"pid {os.getpid()}" in line
    assert not (out / "model.safetensors").exists()
    # once released, the same folder trains
    assert main(["train", str(shapes), "--out", str(out), "--epochs", "1", *FAST]) == 0
    assert (out / "model.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_a_killed_holders_lock_does_not_stick(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from imgrec.files import FolderLock; "
         f"FolderLock(__import__('pathlib').Path({str(out)!r})).acquire(); print('held', "
         "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="in use"):
            FolderLock(out).acquire()
    finally:
        holder.kill()  # kill -9: no clean-up runs
        holder.wait()
    FolderLock(out).acquire().release()  # the kernel dropped the dead process's lock


def test_failed_run_removes_the_folder_it_created(tmp_path, capsys):
    data = tmp_path / "broken"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            (data / cls / f"{i}.jpg").write_text("not a picture\n")
    out = tmp_path / "run"
    line = _one_error_line(capsys, main(["train", str(data), "--out", str(out), "--epochs", "1",
                                         *[f for f in FAST if f != "--no-tensorboard"]]))
    assert "no training image could be read" in line
    assert not out.exists()  # TensorBoard had written into it before the failure


@pytest.mark.parametrize("bad", ["/proc/imgrec-x", "FILE"])
def test_unwritable_out_is_one_line_before_any_work(shapes, tmp_path, capsys, monkeypatch, bad):
    import imgrec.training.plan as plan

    if bad == "FILE":
        bad = str(tmp_path / "a-file")
        Path(bad).write_text("x")
    monkeypatch.setattr(plan, "load_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    line = _one_error_line(capsys, main(["train", str(shapes), "--out", bad, *FAST]))
    assert bad in line and ("cannot write" in line or "is a file" in line)


def test_evaluate_checks_its_outputs_before_evaluating(shapes, tmp_path, capsys, monkeypatch):
    from bundles import make_tiny_bundle

    import imgrec.evaluation as evaluation

    bundle = make_tiny_bundle(tmp_path / "b")
    monkeypatch.setattr(evaluation, "evaluate_bundle",
                        lambda *a, **k: pytest.fail("evaluated before checking --json"))
    line = _one_error_line(capsys, main(["evaluate", str(bundle), str(shapes),
                                         "--json", "/proc/imgrec-m.json"]))
    assert "--json /proc/imgrec-m.json" in line


def test_sigterm_saves_and_exits_143(shapes, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgrec.cli", "train", str(shapes), "--out", str(out),
         "--epochs", "200", *FAST[:-1]], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        for line in proc.stderr:  # wait for the first finished epoch
            if line.startswith("epoch 1/200  loss") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, rest
    assert (out / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()


def test_curves_mark_whole_epochs_only(tmp_path, monkeypatch):
    """Two epochs were drawn on ticks 1.0, 1.2, 1.4 ... 2.0: an epoch 1.5 never ran."""
    from imgrec import history

    drawn = []
    monkeypatch.setattr(history, "save_figure", lambda fig, path, **kw: drawn.append(fig))
    rows = [{"epoch": e, "train_loss": 1 / e, "train_acc": e / 3, "val_loss": 1.1 / e,
             "val_acc": e / 4} for e in (1, 2)]
    history.plot_curves(tmp_path / "c.png", rows)
    for ax in drawn[0].axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks == [1.0, 2.0], ticks
