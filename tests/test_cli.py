"""The command line from outside: bad input is one `imgrec: error:` line on stderr and exit
status 2, never a traceback; a tiny train -> evaluate -> predict run through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from helpers import trained_shapes, truncated_jpeg

from imgrec.cli import main


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("imgrec: error: ")
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_path(capsys, tmp_path):
    line = _one_error_line(capsys, main(["train", str(tmp_path / "nowhere")]))
    assert "nowhere" in line and "folder or CSV" in line


def test_unknown_dataset_name(capsys):
    line = _one_error_line(capsys, main(["train", "mnsit"]))
    assert "'mnsit'" in line and "mnist" in line


def test_builtin_offline(capsys, tmp_path):
    line = _one_error_line(capsys, main(["train", "mnist", "--data-dir", str(tmp_path)]))
    assert "train-images-idx3-ubyte.gz" in line and str(tmp_path / "mnist") in line


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "many"], "--epochs"),
    (["--optimizer", "foo"], "--optimizer"),
    (["--augment", "bogus=1"], "bogus"),
    (["--augment", "zoom=2"], "zoom"),
    (["--image-size", "2"], "--image-size"),
    (["--invert", "maybe"], "--invert"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--device", "tpu"], "--device tpu: not a device"),  # was an internal error, exit 1
    (["--device", "meta"], "--device meta: imgrec trains on cpu, cuda or mps"),
    # options of another mode were accepted and ignored; a huge seed was an internal error
    (["--model", "small-cnn", "--head", "mlp"], "a scratch network has no transfer head"),
    (["--model", "small-cnn", "--dropout", "0.3"], "a scratch network has no transfer head"),
    (["--model", "efficientnet_lite0", "--mode", "features", "--dropout", "0.3"],
     "the linear head has none"),
    (["--model", "efficientnet_lite0", "--mode", "features", "--optimizer", "sgd"],
     "--optimizer does not apply to --mode features"),
    (["--model", "efficientnet_lite0", "--mode", "features", "--resume"],
     "--resume does not apply to --mode features"),
    (["--model", "efficientnet_lite0", "--pretrained", "--weights", "w.safetensors"],
     "--pretrained and --weights both give"),
    (["--seed", "99999999999999999999"], "--seed must be a whole number from 0 to"),
    (["--weight-decay", "inf"], "--weight-decay must be a number from 0 to 10"),
    (["--model", "efficientnet_lite0", "--mode", "features", "--augment", "standard"],
     "without them it does nothing"),
])
def test_invalid_train_flags(capsys, shapes, flags, needle):
    line = _one_error_line(capsys, main(["train", str(shapes), *flags, "--quiet"]))
    assert needle in line


def test_unknown_option_and_command(capsys):
    assert "--bogus" in _one_error_line(capsys, main(["predict", "--bogus", "x.jpg"]))
    assert "frobnicate" in _one_error_line(capsys, main(["frobnicate"]))
    assert "--top-k" in _one_error_line(capsys, main(["predict", "--top-k", "0", "x.jpg"]))
    # an option without its value points at the command's help, not imgrec's
    assert "(see `imgrec serve --help`)" in _one_error_line(capsys, main(["serve", "m",
                                                                         "--port"]))


def test_predict_non_image_and_truncated(capsys, tmp_path_factory, tmp_path):
    bundle = trained_shapes(tmp_path_factory) / "bundle"
    text = tmp_path / "notes.jpg"
    text.write_text("just text")
    line = _one_error_line(capsys, main(["predict", "--model", str(bundle), str(text)]))
    assert "notes.jpg" in line and "not an image" in line
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    line = _one_error_line(capsys, main(["predict", "--model", str(bundle), str(cut)]))
    assert "cut.jpg" in line and "truncated" in line
    line = _one_error_line(capsys, main(["predict", "--model", str(bundle), str(cut),
                                         str(text)]))
    assert "none of the 2 inputs" in line
    good = sorted((tmp_path_factory.getbasetemp()).rglob("disc_000.png"))[0]
    for json_flag in ([], ["--json"]):  # some read: exit 0, and one warning line on stderr
        assert main(["predict", "--model", str(bundle), str(cut), str(good), *json_flag]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "1 of 2 inputs could not be read" in err[0], err
    line = _one_error_line(capsys, main(["predict", "--model", str(bundle),
                                         str(tmp_path / "missing.png")]))
    assert "missing.png" in line and "no such file" in line


def test_nonexistent_bundle(capsys, shapes, tmp_path):
    line = _one_error_line(capsys, main(["evaluate", str(tmp_path / "nobundle"), str(shapes)]))
    assert "nobundle" in line and "bundle" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    line = _one_error_line(capsys, main(["predict", "--model", str(broken), "x.jpg"]))
    assert "imgrec.json is missing" in line


def test_bare_command_shows_help(capsys):
    assert main([]) == 0
    assert "Usage" in capsys.readouterr().out


def test_cli_train_evaluate_predict(capsys, shapes, tmp_path):
    out = tmp_path / "run"
    code = main(["train", str(shapes), "--model", "fast-cnn", "--epochs", "3", "--image-size",
                 "32", "--batch-size", "16", "--augment", "none", "--workers", "0", "--out",
                 str(out), "--json", "--no-tensorboard"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["bundle"] == str(out) and summary["epochs_run"] == 3
    assert summary["test"]["accuracy"] >= 0.75 and summary["skipped"] == {}
    metrics = tmp_path / "m.json"
    assert main(["evaluate", str(out), str(shapes), "--json", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["accuracy"] >= 0.75
    capsys.readouterr()
    img = sorted((shapes / "disc").glob("*.png"))[0]
    assert main(["predict", "--model", str(out), str(img), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{img}: ") and line.endswith("%")


def test_real_entry_point_subprocess(tmp_path):
    """The installed console script (or `python -m imgrec.cli`) behaves the same."""
    exe = os.path.join(os.path.dirname(sys.executable), "imgrec")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "imgrec.cli"]
    env = {**os.environ, "IMGREC_DATA": str(tmp_path)}
    env.pop("IMGREC_DEBUG", None)
    bad = subprocess.run([*cmd, "train", "no-such-data"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("imgrec: error: ")
    assert "Traceback" not in bad.stderr
    flag = subprocess.run([*cmd, "train", "mnist", "--epochs", "0"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert flag.returncode == 2 and flag.stderr.startswith("imgrec: error: ")
    assert "--epochs" in flag.stderr and "Traceback" not in flag.stderr
    ok = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "train" in ok.stdout


def test_cli_train_lists_skipped_files(capsys, tmp_path):
    from conftest import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "bad", per_class=12)
    truncated_jpeg(data / "disc" / "broken.jpg")
    (data / "square" / "notes.jpg").write_text("not a picture")
    code = main(["train", str(data), "--model", "fast-cnn", "--epochs", "1", "--image-size",
                 "24", "--workers", "0", "--out", str(tmp_path / "run"), "--json",
                 "--no-tensorboard"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)  # stdout stays pure JSON
    assert sorted(p.rsplit("/", 1)[-1] for p in summary["skipped"]) == ["broken.jpg", "notes.jpg"]
    tail = captured.err.strip().splitlines()[-3:]  # the run ends by listing them
    assert tail[0] == "skipped 2 unreadable file(s):"
    assert {t.split(":")[0].rsplit("/", 1)[-1] for t in tail[1:]} == {"broken.jpg", "notes.jpg"}


@pytest.mark.parametrize("signal_name, code", [("Terminated", 143), ("KeyboardInterrupt", 130)])
def test_an_interrupt_inside_a_command_is_one_line_and_its_signal_code(
        monkeypatch, capsys, signal_name, code):
    """Typer turns Ctrl-C inside a command into a silent 130 (SIGTERM too): imgrec says so and
    exits 128 + the signal, also when training stops before its first epoch."""
    from imgrec.training import api
    from imgrec.training.engine import Terminated

    def interrupted(*args, **kwargs):
        raise Terminated() if signal_name == "Terminated" else KeyboardInterrupt()

    monkeypatch.setattr(api, "train", interrupted)
    assert main(["train", "mnist", "--quiet"]) == code
    err = capsys.readouterr().err
    assert err.strip() == "imgrec: interrupted" and "Traceback" not in err


def test_sigterm_anywhere_in_a_command_is_an_interrupt(monkeypatch, capsys, tmp_path):
    """`kill` outside training's epoch loop (evaluating, extracting features, exporting)
    killed the process silently with a lock and half a folder left; it is now Ctrl-C's
    path: one line, exit 143, and the handler is put back afterwards."""
    import signal
    import time

    from imgrec.training import api

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
        raise AssertionError("SIGTERM was not handled")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(api, "train", killed)
    t = time.monotonic()
    assert main(["train", "mnist", "--quiet"]) == 143
    assert time.monotonic() - t < 4
    assert capsys.readouterr().err.strip() == "imgrec: interrupted"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_full_disk_is_one_line_not_an_internal_error(monkeypatch, capsys):
    import errno

    from imgrec.training import api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/m/curves.png")

    monkeypatch.setattr(api, "train", full)
    assert main(["train", "mnist", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" not in err[0], err
    assert "no space left on the device (writing /runs/m/curves.png)" in err[0]


@pytest.mark.parametrize("work", [None, "imgrec.json", "checkpoint.pt"])
def test_a_stopped_run_keeps_a_new_folder_only_when_it_holds_work(tmp_path, capsys, work):
    """Ctrl-C while the finished model was scored or exported, or a full disk after some
    epochs, removed the new --out with the model and every checkpoint in it."""
    from imgrec.files import output_folder

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), output_folder(out) as folder:
        (folder / "events.out").write_text("x")
        if work:
            (folder / work).write_text("{}")
        raise KeyboardInterrupt
    assert out.exists() == bool(work)
    assert not (out / ".imgrec.lock").exists()
    assert ("kept" in capsys.readouterr().err) == bool(work)


@pytest.mark.parametrize("command", [
    ["explain", "{bundle}", "{photo}", "--out", "{blocked}/cam.png"],
    ["kernels", "{photo}", "--out", "{blocked}/kernels.png"],
    ["predict", "{photo}", "--model", "{bundle}", "--out", "{blocked}/results.jsonl"],
    ["doctor", "{folder}", "--json", "{blocked}/doctor.json"],
])
def test_an_output_that_cannot_be_written_is_one_line_before_the_work(
        command, capsys, tmp_path, sample_photo):
    """An --out / --json under a file (or in a read-only folder) is refused in one line with
    exit 2 before anything runs; it was an internal error (exit 1) after the work."""
    from bundles import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "c.jpg").write_bytes(sample_photo("chelsea").read_bytes())
    args = [a.format(bundle=bundle, photo=sample_photo("chelsea"), blocked=blocked,
                     folder=folder.parent) for a in command]
    line = _one_error_line(capsys, main(args))
    assert "a-file is a file, not a folder" in line


def test_atomic_write_into_a_file_is_an_imgrec_error(tmp_path):
    from imgrec.bundle import atomic_write_bytes
    from imgrec.errors import ImgrecError

    (tmp_path / "f").write_text("x")
    with pytest.raises(ImgrecError, match="cannot write .*f/g.bin"):
        atomic_write_bytes(tmp_path / "f" / "g.bin", b"data")


def test_train_refuses_an_out_folder_of_other_files(capsys, shapes, tmp_path):
    """--out holding the user's own files (not a bundle) is refused before anything is
    written: the bundle's config.json and history.csv would have replaced theirs."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"precious": true}')
    (mine / "history.csv").write_text("my notes")
    line = _one_error_line(capsys, main(["train", str(shapes), "--model", "fast-cnn",
                                         "--epochs", "1", "--out", str(mine), "-q"]))
    assert "is not empty and not an imgrec bundle (config.json, history.csv)" in line
    assert (mine / "config.json").read_text() == '{"precious": true}'
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "history.csv"]


def test_train_may_replace_a_bundle_or_fill_an_empty_folder(shapes, tmp_path):
    from imgrec.files import check_run_folder

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")
    assert check_run_folder(empty) == empty
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "imgrec.json").write_text("{}")
    (bundle / "notes.txt").write_text("")
    assert check_run_folder(bundle) == bundle
    assert check_run_folder(tmp_path / "new") == tmp_path / "new"


def test_benchmark_refuses_a_batch_too_large_to_time(capsys, tmp_path):
    from bundles import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    line = _one_error_line(capsys, main(["benchmark", str(bundle), "--batch-sizes", "1,100000"]))
    assert "from 1 to 4096" in line


def test_evaluate_never_writes_into_a_read_only_data_tree(tmp_path, monkeypatch):
    """The default figure folder goes beside the data only where its permission bits allow
    writing: as root os.access says yes even in a read-only tree (a shared dataset)."""
    from types import SimpleNamespace

    from imgrec.cli import _evaluation_folder

    tree = tmp_path / "shared"
    (tree / "photos").mkdir(parents=True)
    bundle = SimpleNamespace(path=tmp_path / "model")
    assert _evaluation_folder(str(tree / "photos"), bundle, "test").parent == tree
    tree.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        assert _evaluation_folder(str(tree / "photos"), bundle, "test") == \
            tmp_path / "photos-eval-model-test"
    finally:
        tree.chmod(0o755)


def test_a_file_name_holding_a_newline_stays_on_one_line(capsys, tmp_path_factory, tmp_path):
    """predict's lines, its one error line and doctor's issue lines printed such a name raw,
    splitting the record in two; the newline is now written as \\n."""
    import shutil

    bundle = trained_shapes(tmp_path_factory) / "bundle"
    good = sorted((tmp_path_factory.getbasetemp()).rglob("disc_000.png"))[0]
    odd = tmp_path / "a\nb.png"
    shutil.copy(good, odd)
    assert main(["predict", "--model", str(bundle), str(odd)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "a\\nb.png: " in out[0], out
    bad = tmp_path / "c\nd.png"
    bad.write_text("text")
    line = _one_error_line(capsys, main(["predict", "--model", str(bundle), str(bad)]))
    assert "c\\nd.png" in line
    data = tmp_path / "data"
    for cls in ("x", "y"):
        (data / cls).mkdir(parents=True)
        shutil.copy(good, data / cls / "keep.png")
    (data / "x" / "e\nf.png").write_text("text")
    main(["doctor", str(data)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "f.png" in ln]
    assert len(lines) == 1 and "x/e\\nf.png: " in lines[0], lines


def test_the_command_exits_though_a_worker_ignores_sigterm(tmp_path):
    """A resumed training hung at exit: its DataLoader workers (which leave SIGTERM to the
    main process) outlived the run, and multiprocessing's exit handler terminates such
    children with SIGTERM, then waits for them for ever. `script` now ends them first."""
    import time

    code = (
        "import multiprocessing, signal, time\n"
        "import torch  # script() then takes its fast way out, as after training\n"
        "import imgrec.cli as cli\n"
        "def stubborn():\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.Process(target=stubborn, daemon=True).start()\n"
        "    time.sleep(0.5)\n"
        "    cli.main = lambda: 0\n"
        "    cli.script()\n")
    script = tmp_path / "stubborn.py"
    script.write_text(code)
    t = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - t < 60


BLOCKED_IMPORTS = """
import sys

class Missing:  # an install without these packages
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in sys.argv[1].split(","):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
for name in list(sys.modules):  # nothing of them imported already
    if name.split(".")[0] in sys.argv[1].split(","):
        del sys.modules[name]
from imgrec.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _without(modules: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGREC_DATA": str(tmp_path)}
    env.pop("IMGREC_DEBUG", None)
    return subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, modules, *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def test_the_cli_needs_no_click(tmp_path):
    """`pip install imgrec` (no extras) has Typer, whose recent versions carry their own click
    and no longer install it: the command line must not import click."""
    ok = _without("click", "--help", tmp_path=tmp_path)
    assert ok.returncode == 0 and "train" in ok.stdout, ok.stderr
    bad = _without("click", "predict", "--top-k", "abc", tmp_path=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("imgrec: error: "), bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("modules, args, extra", [
    ("fastapi,uvicorn,starlette", ["serve", "mnist-bundle-not-needed"], "serve"),
    ("optuna,sqlalchemy", ["tune", "{shapes}", "--trials", "1"], "tune"),
    # before the work (the bundle is not even opened), not after scoring every image
    ("sklearn", ["evaluate", "no-such-bundle", "{shapes}"], "train"),
    ("cleanlab", ["doctor", "{shapes}", "--labels"], "audit"),
])
def test_a_missing_extra_is_named_in_one_line(shapes, tmp_path, modules, args, extra):
    """A train-only install running `imgrec serve` (or `tune` without optuna) is told which
    extra to install, exit 2: it was an internal error naming fastapi (or sqlalchemy)."""
    got = _without(modules, *(a.format(shapes=shapes) for a in args), tmp_path=tmp_path)
    err = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(err) == 1, got.stderr
    assert f"pip install 'imgrec[{extra}]'" in err[0] and "internal error" not in err[0]


def test_train_expands_a_tilde_in_out(shapes, tmp_path, monkeypatch):
    """`--out=~/runs/x` (the shell leaves a `~` after `=` alone) writes one bundle, in the
    home folder: it was written to a literal ./~/runs/x and an empty folder left at home."""
    from imgrec.training.config import TrainConfig
    from imgrec.training.plan import make_plan

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    plan = make_plan(TrainConfig(data=str(shapes), model="fast-cnn", quiet=True,
                                 out="~/runs/x"))
    assert plan.out == tmp_path / "home" / "runs" / "x"


def test_version(capsys):
    from imgrec import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imgrec {__version__}"


def test_output_piped_into_a_reader_that_leaves_is_no_traceback(tmp_path):
    """`imgrec | head -1`: the help's second line met a closed pipe, and a BrokenPipeError
    traceback followed."""
    script = tmp_path / "pipe.sh"
    script.write_text(f'"{sys.executable}" -m imgrec.cli | true\n')
    got = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in got.stderr and "BrokenPipe" not in got.stderr, got.stderr
