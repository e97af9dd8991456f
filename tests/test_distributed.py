"""Distributed data-parallel training (torchrun, gloo on the CPU): shards, reduced metrics,
rank 0 alone writing, the transfer modes, a killed rank, --resume and `--nproc`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shapes_dataset

from imgrec.training.config import TrainConfig, config_argv
from imgrec.training.distributed import World, eval_indices, shard_batches, world_from_env

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# A training script run by torchrun: tiny in-memory arrays whose pixels (0, 0) and (0, 1) spell
# each image's index, so a callback on every rank records which images that rank trained on.
SCRIPT = """
import json, os, sys
import numpy as np
import imgrec

class Seen:
    def __init__(self):
        self.seen = []
    def on_batch_end(self, state, batch, logs):
        x = logs["x"]
        self.seen += (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()
        self.counted = logs["seen"]
    def on_train_end(self, state, logs):
        rank = os.environ["RANK"]
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump({"seen": self.seen, "counted": self.counted,
                       "history": logs["history"]}, f)

rng = np.random.default_rng(0)
n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
x = rng.integers(0, 120, (n, 12, 12), dtype=np.uint8)
y = (np.arange(n) % 2).astype(np.int64)
x[y == 1, 3:9, 3:9] = 255
x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
result = imgrec.train((x, y), epochs=1, batch_size=20, augment="none", out=sys.argv[2],
                      val_fraction=0.2, test_fraction=0.1, callbacks=[Seen()])
with open(os.path.join(sys.argv[1], f"result{os.environ['RANK']}.json"), "w") as f:
    json.dump({"bundle": result.bundle and str(result.bundle.path)}, f)
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)


# -- pieces, in one process ----------------------------------------------------------------
def test_world_from_env():
    assert not world_from_env({}).active
    w = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.active, w.main) == (1, 2, 1, 2, True,
                                                                              False)


@pytest.mark.parametrize("n", [128, 130, 131])
def test_shards_split_each_global_batch(n):
    """Together the ranks see each global batch of one process, in equal-sized parts; an
    uneven last batch is padded from the start (as DistributedSampler pads)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    parts = [list(shard_batches(order, 16, World(r, 3))) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    for step, batches in enumerate(zip(*parts, strict=True)):
        assert len({len(b) for b in batches}) == 1
        glob = set(order[step * 48 : (step + 1) * 48].tolist())
        assert set(torch.cat(batches).tolist()) - glob <= set(order[:2].tolist())
        assert glob <= set(torch.cat(batches).tolist())
    assert sorted(set(torch.cat([torch.cat(p) for p in parts]).tolist())) == list(range(n))
    shards = [set(eval_indices(n, World(r, 3))) for r in range(3)]
    assert sum(map(len, shards)) == n and set.union(*shards) == set(range(n))


def test_config_argv_rebuilds_the_command():
    options = {f: getattr(TrainConfig("x"), f) for f in TrainConfig.__dataclass_fields__
               if f not in ("data", "test_fraction", "lookahead", "model_args")}
    options.update(data="photos", epochs=3, tensorboard=False, quiet=True, lr=0.01, nproc=2,
                   sync_bn=True)
    assert config_argv(options) == ["photos", "--epochs", "3", "--lr", "0.01", "--sync-bn",
                                    "--no-tensorboard", "--quiet"]


def test_sync_bn_under_torchrun_itself_is_one_line_from_rank_0(tmp_path):
    """Started by torchrun directly (not --nproc), every rank refuses --sync-bn: rank 0's line
    comes out, and the other rank, which waits RANK0_FIRST_S (cli.main), is stopped silently."""
    r = _run([PY, "-m", "imgrec.training.distributed", "--standalone", "--nproc-per-node=2",
              "-m", "imgrec", "train", str(make_shapes_dataset(tmp_path / "d", per_class=4)),
              "--sync-bn", "--epochs", "1", "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("imgrec:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "--sync-bn needs CUDA" in lines[0], r.stderr


def test_sync_bn_is_refused_on_the_cpu(tmp_path):
    """One clear line from rank 0, exit 2, and nothing from the other rank."""
    r = _run([PY, "-m", "imgrec", "train", "--nproc", "2", str(make_shapes_dataset(
        tmp_path / "d", per_class=4)), "--sync-bn", "--epochs", "1", "--out",
        str(tmp_path / "o")])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("imgrec:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "--sync-bn needs CUDA" in lines[0]
    assert all(ln.startswith(("imgrec:", "note: OMP_NUM_THREADS")) for ln in
               r.stderr.splitlines()), r.stderr  # no torchrun log lines, no traceback


# -- two processes -------------------------------------------------------------------------
def test_two_ranks_train_disjoint_shards_and_rank0_alone_writes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "bundle"
    r = _run([*TORCHRUN, "--log-dir", str(tmp_path / "logs"), str(script), str(tmp_path),
              str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    a, b = (set(x["seen"]) for x in ranks)
    assert len(ranks[0]["seen"]) == len(a) and len(ranks[1]["seen"]) == len(b)
    record = json.loads((out / "imgrec.json").read_text())["training"]
    train = record["splits"]["train"]
    assert not a & b and len(a | b) == train  # together: the whole training split, once
    # the bundle says the batch was per process (it read like a one-process batch-20 run)
    assert (record["batch_size"], record["processes"], record["global_batch"]) == (20, 2, 40)
    for row in (r_["history"][0] for r_ in ranks):
        row.pop("seconds")
    assert ranks[0]["history"] == ranks[1]["history"]  # reduced metrics: the same everywhere
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert results[0]["bundle"] == str(out) and results[1]["bundle"] is None
    files = sorted(p.name for p in out.iterdir())
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1
    assert {"imgrec.json", "model.safetensors", "model.onnx", "history.csv",
            "checkpoint.pt"} <= set(files)
    assert "progress" not in r.stdout
    from imgrec.bundle import read_bundle
    from imgrec.predict import Predictor

    bundle = read_bundle(out)
    assert bundle.metrics["test"]["n"] == bundle.training["splits"]["test"]
    img = np.full((12, 12), 255, np.uint8)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "x.png")
    assert len(Predictor(bundle).predict([str(tmp_path / "x.png")], top_k=2)[0]) == 2


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """timm's tiny test_efficientnet with random weights saved as a --weights file."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["features", "finetune"])
def test_transfer_modes_on_two_ranks(mode, tiny_backbone, tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", per_class=12, layout="split",
                               seed=["features", "finetune"].index(mode) + 1)  # fresh photos
    out = tmp_path / mode
    scratch = tmp_path / "tmp"  # the processes' temporary folder
    scratch.mkdir()
    r = subprocess.run([PY, "-m", "imgrec", "train", str(data), "--nproc", "2", "--model",
                        "test_efficientnet", "--weights", str(tiny_backbone), "--mode", mode,
                        "--epochs", "2", "--image-size", "64", "--out", str(out), "--json",
                        "--no-tensorboard", "--workers", "0"],
                       capture_output=True, text=True, timeout=240, env=_env(TMPDIR=str(scratch)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(scratch.glob("*torch*"))  # torchrun's log folder went with the job
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    from imgrec.bundle import read_bundle
    from imgrec.predict import Predictor

    bundle = read_bundle(out)
    t = bundle.training
    assert t["mode"] == mode and summary["test"]["n"] == 8
    # every photo of every split embedded once, between the two ranks
    assert t["features_computed"] == 24 + 8 + 8 and t["features_cached"] == 0
    photo = sorted((data / "test" / "disc").glob("*.png"))[0]
    assert len(Predictor(bundle).predict([str(photo)], top_k=2)[0]) == 2


def _rank_pids(root: int) -> dict[int, int]:
    """The torchrun workers under a process: rank -> pid (from their environment)."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:  # every thread's children: a process may start one from another thread
            children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks and b"imgrec" in Path(f"/proc/{pid}/cmdline").read_bytes():
            found[int(ranks[0])] = pid
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_killed_rank_ends_the_job_and_resume_completes(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", per_class=60)
    out = tmp_path / "run"
    cmd = [PY, "-m", "imgrec", "train", str(data), "--nproc", "2", "--epochs", "40",
           "--image-size", "32", "--batch-size", "8", "--workers", "0", "--out", str(out),
           "--no-tensorboard", "--patience", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "no epoch finished"
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1}, f"rank pids under {proc.pid}: {pids}"
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 60
    lines = [ln for ln in err.splitlines() if ln.startswith("imgrec:")]
    # torchrun names the killed rank, unless rank 0 noticed the lost peer and left first
    if proc.returncode == 128 + signal.SIGKILL:
        assert len(lines) == 1 and "rank 1 died (SIGKILL)" in lines[0], err[-2000:]
    else:
        assert proc.returncode == 75, err[-2000:]
        assert len(lines) == 1 and "rank 0 lost contact" in lines[0], err[-2000:]
    assert "--resume" in lines[0]
    assert "Traceback" not in err
    r = _run([*cmd[:cmd.index("--epochs") + 1], "3", *cmd[cmd.index("--epochs") + 2:],
              "--resume"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # (the kill may land after epoch 3: then the checkpoint has every epoch asked for)
    assert "resume  from epoch" in r.stderr or "nothing left to train" in r.stderr
    assert json.loads((out / "imgrec.json").read_text())["training"]["epochs_run"] >= 3


def test_a_ranks_padding_is_trained_on_but_not_counted(tmp_path):
    """An odd training split: the rank that runs one image twice (so both run the same steps)
    counted it twice in the split's loss and accuracy (81 images reported as 40/41). The
    ranks' counts now add up to the split."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "bundle"
    r = _run([*TORCHRUN, "--log-dir", str(tmp_path / "logs"), str(script), str(tmp_path),
              str(out), "97"])
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    train = json.loads((out / "imgrec.json").read_text())["training"]["splits"]["train"]
    assert train % 2 == 1  # an odd split: one rank is padded
    assert sorted(len(x["seen"]) for x in ranks) == [(train + 1) // 2] * 2  # both ran as many
    assert sum(x["counted"] for x in ranks) == train  # and counted each image once


class _Failure:
    """torchrun's ProcessFailure, as report_failure reads it."""

    def __init__(self, exitcode: int, timestamp: int):
        self.exitcode, self.timestamp = exitcode, timestamp

    def signal_name(self) -> str:
        return signal.Signals(-self.exitcode).name


@pytest.mark.parametrize("failures, status, says", [
    # the survivor's exit seen first, the killed rank in the list too: the kill is named
    ({0: _Failure(75, 1), 1: _Failure(-9, 2)}, 137, "rank 1 died (SIGKILL)"),
    # only the survivor's exit: it printed nothing under the launcher, so the launcher says it
    ({0: _Failure(75, 1)}, 75, "rank 0 lost contact with the other ranks"),
    # a rank's own error (bad input): it printed its line, the launcher adds none
    ({1: _Failure(2, 1)}, 2, None),
    # ... even when torchrun saw first the other rank it stopped (SIGTERM caught: exit 143)
    ({1: _Failure(143, 1), 0: _Failure(2, 2)}, 2, None),
    ({1: _Failure(-15, 1), 0: _Failure(2, 2)}, 2, None),
])
def test_a_failed_job_is_reported_in_one_line(failures, status, says, capsys):
    from imgrec.training.distributed import report_failure

    assert report_failure(failures) == status
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("imgrec:")]
    if says is None:
        assert lines == []
    else:
        assert len(lines) == 1 and says in lines[0] and "--resume" in lines[0]



@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_torchrun_interrupted_is_one_line_and_its_signal_code(monkeypatch, capsys, signum):
    """Ctrl-C on `imgrec train --nproc 2` ended with torchrun's raw traceback
    ("SignalException: Process N got signal: 2") and exit 1."""
    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from imgrec.training.distributed import torchrun

    def stopped(args):
        raise SignalException("Process 1 got signal", sigval=signal.Signals(signum))

    monkeypatch.setattr(run, "run", stopped)
    assert torchrun(["--standalone", "--nproc-per-node=2", "-m", "imgrec"]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: interrupted") and "--resume" in err[0]


def test_sigterm_to_the_command_is_passed_on_to_torchrun(monkeypatch):
    """`kill PID` or `timeout` on `imgrec train --nproc 2` ended the command at once while
    torchrun and the ranks went on training (and wrote the bundle 14 s later)."""
    import subprocess

    from imgrec.errors import Terminated
    from imgrec.training import distributed

    sent = []

    class Launcher:
        waits = 0

        def __init__(self, cmd, env):
            pass

        def wait(self):
            Launcher.waits += 1
            if Launcher.waits == 1:
                raise Terminated  # the SIGTERM, arriving while the command waits
            return 143 if sent else 0

        def send_signal(self, signum):
            sent.append(signum)

    monkeypatch.setattr(subprocess, "Popen", Launcher)
    assert distributed.launch(2, ["mnist"]) == 143
    assert sent == [signal.SIGTERM]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_that_dies_with_its_parent_does(tmp_path):
    """`kill -9` of `imgrec train --nproc 2` left torchrun and the ranks training (and holding
    the --out lock): the launcher and each rank now get SIGTERM when their parent dies."""
    child = ("import time\n"
             "from imgrec.training.distributed import die_with_parent\n"
             "die_with_parent()\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    middle = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    pid = int(middle.stdout.readline())
    assert middle.stdout.readline().strip() == "ready"
    middle.kill()  # SIGKILL: nothing of the parent's own runs
    middle.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
            break  # ended, waiting for init to reap it
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def test_a_rank_stopped_by_a_signal_removes_the_new_out_it_had_no_work_in(tmp_path):
    """Ctrl-C under --nproc before the first checkpoint left the new --out behind with its
    lock and events file (the rank leaves by os._exit, which skips the folder's cleanup);
    one run alone removed it. A folder with a checkpoint, or one that existed, stays."""
    from imgrec.files import output_folder, remove_unfinished

    fresh, worked, existing = tmp_path / "fresh", tmp_path / "worked", tmp_path / "existing"
    existing.mkdir()
    with output_folder(fresh), output_folder(worked), output_folder(existing):
        for folder in (fresh, worked, existing):
            (folder / "events.out.tfevents.1").write_text("x")
        (worked / "checkpoint.pt").write_text("x")
        remove_unfinished()  # what the signal handler runs before os._exit
        assert not fresh.exists() and worked.is_dir() and existing.is_dir()
    with output_folder(tmp_path / "done"):
        (tmp_path / "done" / "events.out.tfevents.2").write_text("x")
    remove_unfinished()  # a finished run's folder is no longer this process's to remove
    assert (tmp_path / "done").is_dir()
