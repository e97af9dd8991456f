"""Distributed data-parallel training: PyTorch DDP in processes started by `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK in every process; without them a run is one
process and nothing here is called beyond `world_from_env`. With them, each rank loads the same
plan, trains on its own shard of every epoch (loaders.Batches), averages gradients through DDP
(gloo on the CPU, nccl on CUDA with device cuda:LOCAL_RANK), reduces its metrics with the
others (so accuracies cover the whole split and early stopping decides the same everywhere),
and only rank 0 writes the bundle, the record, TensorBoard and checkpoints.

Learning rate and schedule: a run of N processes with --batch-size B is the single-process run
with batch N x B: the same peak learning rate (imgrec never scales it by batch size: --lr or the
recipe's) and the same number of optimizer steps per epoch, each global batch being exactly the
images the single process would have drawn (in-memory data). Without --batch-size the recipe's
batch is the global one, split between the processes.

Failures: collectives and the rendezvous time out (IMGREC_DIST_TIMEOUT seconds, default 1800);
a rank that dies makes torchrun stop the others (SIGTERM), which exit at once without touching
the output folder, so the last epoch's checkpoint resumes the run (`--resume`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import ImgrecError

TIMEOUT_ENV = "IMGREC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
#: set by `imgrec train --nproc`: the launcher reports a dead rank, so the others stay quiet
LAUNCHER_ENV = "IMGREC_LAUNCHER"
#: the last checkpointed epoch and where, for the line printed when the run is stopped
_PROGRESS: dict[str, Any] = {"epoch": 0, "out": None}


class DistributedFailure(ImgrecError):
    """A rank lost contact with the others (one died or the network dropped)."""

    #: EX_TEMPFAIL (the run can go on with --resume): tells the launcher this rank said nothing
    exit_code = 75


@dataclass(frozen=True)
class World:
    """This process's place in the job: one process unless torchrun started it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env(environ: Any = None) -> World:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (absent: one process)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    try:
        size = int(env["WORLD_SIZE"])
        return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", size)))
    except ValueError:
        raise ImgrecError("RANK / WORLD_SIZE / LOCAL_RANK must be integers",
                          "start distributed runs with torchrun") from None


def is_main_process() -> bool:
    """Rank 0, or no torchrun (cheap: the CLI asks before printing an error)."""
    return os.environ.get("RANK", "0") == "0"


def timeout() -> timedelta:
    try:
        return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise ImgrecError(f"{TIMEOUT_ENV} must be a number of seconds") from None


# -- the process group -----------------------------------------------------------------------
@contextmanager
def session(plan: Any) -> Iterator[None]:
    """The process group for a run (nothing when it is one process); SIGTERM / SIGINT stop a
    rank at once, and a lost peer becomes one line saying how to resume."""
    world = plan.world
    if not world.active:
        yield
        return
    import torch.distributed as dist

    _PROGRESS.update(epoch=0, out=plan.out)
    _init(world, plan.device, plan.cfg.sync_bn)
    old = {s: signal.signal(s, _stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with peers_guard(world):
            yield
            # every rank leaves together: one that tore its process group down while rank 0
            # still wrote the bundle aborted once in CI ("terminate called without an active
            # exception", SIGABRT), and torchrun then stopped rank 0 mid-write
            dist.barrier()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


#: seconds a rank other than 0 waits before leaving on a user error (cli.main), which every
#: rank usually meets alike (a bad path, --sync-bn on the CPU): rank 0 prints the one line and
#: exits first, so torchrun reports its failure and stops the others, instead of stopping rank
#: 0 before it has said anything (exit 2 and no message, seen once in CI)
RANK0_FIRST_S = 3.0


def check_sync_bn(sync_bn: bool, device_type: str) -> None:
    """--sync-bn only where SyncBatchNorm runs: CUDA."""
    if sync_bn and device_type != "cuda":
        raise ImgrecError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the "
                          "CPU", "drop --sync-bn (each CPU rank keeps its own BatchNorm "
                          "statistics; rank 0's are saved)")


def _init(world: World, device: Any, sync_bn: bool) -> None:
    import torch
    import torch.distributed as dist

    check_sync_bn(sync_bn, device.type)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timeout())
    except Exception as e:  # noqa: BLE001 (the rendezvous failed: one line, not a traceback)
        raise DistributedFailure(f"rank {world.rank}: could not join the process group "
                                 f"({_first_line(e)})",
                                 "check --rdzv-endpoint / MASTER_ADDR and that every node "
                                 "started") from None


@contextmanager
def peers_guard(world: World) -> Iterator[None]:
    """A collective that fails (a peer's socket closed, a timeout) ends this rank at once,
    before any cleanup could remove the output folder holding the checkpoint."""
    try:
        yield
    except RuntimeError as e:
        if not world.active or not _peer_lost(e):
            raise
        _lost(world, e)


def _peer_lost(e: RuntimeError) -> bool:
    """Whether an error comes from the process group (gloo and nccl raise plain RuntimeErrors
    as well as torch.distributed.DistError)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or any(
        k in text for k in ("gloo", "NCCL", "Connection closed", "c10d", "ProcessGroup"))


def _lost(world: World, e: RuntimeError) -> None:
    """A rank that lost its peers leaves at once, keeping the output folder (and its
    checkpoint) as it is; the launcher of `--nproc` names the rank that died, else this
    rank says what happened."""
    if not os.environ.get(LAUNCHER_ENV):
        peers = f"rank {1 - world.rank}" if world.size == 2 else "the other ranks"
        failure = DistributedFailure(f"rank {world.rank} lost contact with {peers}, which died "
                                     f"or dropped off the network ({_first_line(e)})",
                                     resume_hint())
        print(f"imgrec: error: {failure}", file=sys.stderr, flush=True)
    os._exit(DistributedFailure.exit_code)


def _first_line(e: BaseException) -> str:
    """The gist of a backend's error: its last line, without gloo's [file.cc:line] prefix,
    up to the first full stop."""
    import re

    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1]) if lines else type(e).__name__
    return text.split(". ")[0][:160]


def resume_hint() -> str:
    """What to do after a stopped run: resume from the last checkpoint, if there is one."""
    epoch, out = _PROGRESS["epoch"], _PROGRESS["out"]
    if not epoch:
        return "nothing was checkpointed yet: rerun the same command"
    return f"rerun the same command with --resume (continues after epoch {epoch} in {out})"


def checkpointed(epoch: int) -> None:
    _PROGRESS["epoch"] = epoch


def _stopped(signum: int, frame: Any) -> None:
    """torchrun stops every rank (SIGTERM) when one fails; Ctrl-C reaches them all. A rank
    cannot save mid-epoch without the others, so it leaves now: the output folder keeps the
    last epoch's checkpoint. Rank 0 says so, unless `imgrec train --nproc` reports it."""
    if is_main_process() and not os.environ.get(LAUNCHER_ENV):
        name = signal.Signals(signum).name
        print(f"imgrec: error: rank 0 stopped by {name} (torchrun stops every rank when one "
              f"fails); {resume_hint()}", file=sys.stderr, flush=True)
    if is_main_process():  # os._exit skips output_folder's cleanup: a new --out goes here
        from ..files import remove_unfinished

        remove_unfinished()
    os._exit(128 + signum)


# -- collectives -----------------------------------------------------------------------------
def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Sum numbers across ranks (float64, on the CPU: gloo and nccl alike through the
    backend's device)."""
    if not world.active:
        return values
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not world.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_dicts(world: World, mine: dict) -> dict:
    """Every rank's dict merged (skipped files)."""
    if not world.active:
        return mine
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in (p or {}).items()}


# -- sharding --------------------------------------------------------------------------------
def shard_batches(order: Any, batch_size: int, world: World) -> Iterator[Any]:
    """This rank's part of each global batch (batch_size x world images of `order`, taken
    in turn: rank r gets positions r, r + world, ...), so the ranks together see exactly the
    batches one process would. A last global batch that does not split evenly is padded from
    the start of `order` (as DistributedSampler pads), so every rank runs the same number of
    equal steps."""
    glob = batch_size * world.size
    n = len(order)
    for i in range(0, n, glob):
        chunk = order[i : i + glob]
        short = -len(chunk) % world.size
        if short:
            import torch

            chunk = torch.cat([chunk, order[:short]])
        yield chunk[world.rank :: world.size]


def steps_per_epoch(n: int, batch_size: int, world: World) -> int:
    return math.ceil(n / (batch_size * world.size))


def train_sampler(dataset: Any, world: World, shuffle: bool, seed: int) -> Any:
    """A file dataset's training shards: torch's DistributedSampler (a new permutation each
    epoch through set_epoch, padded so every rank runs the same number of steps)."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                              shuffle=shuffle, seed=seed)


def eval_indices(n: int, world: World) -> list[int]:
    """This rank's images of a validation split: every world.size-th, no padding (the reduced
    counts then cover each image exactly once)."""
    return list(range(world.rank, n, world.size))


# -- the model -------------------------------------------------------------------------------
def wrap(model: Any, plan: Any) -> Any:
    """The network every training step runs: DDP around `model` (its parameters stay shared,
    so checkpoints, weight averaging and the bundle use `model` itself). --sync-bn converts
    BatchNorm in place first."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    if plan.cfg.sync_bn:
        for name, child in list(model.named_children()):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [plan.device.index] if plan.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unsync_batchnorm(model: Any) -> Any:
    """SyncBatchNorm back to BatchNorm2d (same parameters and statistics) before the bundle is
    written and exported: a bundle never depends on a process group."""
    import torch

    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum,
                                      child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn.to(child.weight.device if child.affine else "cpu"))
        else:
            unsync_batchnorm(child)
    return model


def describe(plan: Any) -> str:
    """The run's distributed line: processes, backend, threads, per-process and global batch,
    and the learning-rate rule."""
    import torch

    w = plan.world
    backend = "nccl" if plan.device.type == "cuda" else "gloo"
    line = (f"world   {w.size} processes ({backend}, {torch.get_num_threads()} thread(s) each), "
            f"batch {plan.batch_size} per process = {plan.global_batch} global; lr "
            f"{plan.lr:g} as for one process at batch {plan.global_batch}")
    if os.environ.get("OMP_NUM_THREADS") is None:
        line += "; OMP_NUM_THREADS is unset (set it to cores / processes)"
    return line


# -- the local launcher: `imgrec train --nproc N` ---------------------------------------------
#: the launcher's own parent (the `imgrec train --nproc` process), set by `launch`
PARENT_ENV = "IMGREC_LAUNCHER_PARENT"


def die_with_parent(expected_parent: int | None = None) -> None:
    """Linux: SIGTERM to this process when the process that started it dies (`kill -9` of
    `imgrec train --nproc`, an OOM kill, a cancelled CI job left torchrun and the ranks
    training, holding the --out lock). `expected_parent`: when the parent is already gone
    (it died before this call), stop now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGTERM)


def launch(nproc: int, args: list[str]) -> int:
    """torchrun on this machine (--standalone) with N processes running `imgrec train ARGS`;
    returns the failing rank's exit status (0 when all succeed)."""
    import subprocess

    from ..predict import available_cores

    if "--sync-bn" in args:  # the processes would all refuse it: say so before starting them
        check_sync_bn(True, _device_type(args))
    env = dict(os.environ, **{LAUNCHER_ENV: "1", PARENT_ENV: str(os.getpid())})
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // nproc))
        print(f"note: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} per process (cores / processes;"
              " set it to choose)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "imgrec.training.distributed", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "imgrec", "train", *args]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        # Ctrl-C reached the whole process group; a SIGTERM (`kill PID`, `timeout`) only this
        # process: pass it on, or torchrun and the ranks would go on training without it
        if type(e).__name__ == "Terminated":
            proc.send_signal(signal.SIGTERM)
        return proc.wait()


def _device_type(args: list[str]) -> str:
    """The device type the ranks of `imgrec train ARGS` will pick (plan.pick_device's rule
    for --device, else CUDA when present)."""
    import torch

    if "--device" in args and args.index("--device") + 1 < len(args):
        return args[args.index("--device") + 1].split(":")[0]
    return "cuda" if torch.cuda.is_available() else "cpu"


def torchrun(argv: list[str]) -> int:
    """torch.distributed.run with its own logging quiet, a failing rank reported in one line
    (the rank printed its own error; a rank killed by a signal is named here)."""
    import logging

    parent = os.environ.get(PARENT_ENV, "")
    die_with_parent(int(parent) if parent.isdigit() else None)  # ranks: see cli.main
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's own log lines: we report
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.Logger.manager.loggerDict):  # those made before LOGLEVEL was read
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    # torchrun's per-run log folder (tempfile's, by default) outlives the run: one empty
    # /tmp/torchelastic_* folder per `--nproc` run. This one goes when the job ends.
    with tempfile.TemporaryDirectory(prefix="imgrec-torchrun-") as logs:
        if not any(a.split("=")[0] in ("--log-dir", "--log_dir") for a in argv):
            argv = ["--log-dir", logs, *argv]
        try:
            run(parse_args(argv))
            return 0
        except ChildFailedError as e:
            return report_failure(e.failures)
        except SignalException as e:  # Ctrl-C / SIGTERM: torchrun has stopped every rank
            # a new line: a rank's progress bar may have been mid-line
            print(f"\nimgrec: interrupted ({e.sigval.name}): every process stopped; rerun the "
                  "same command (a scratch or finetune run: with --resume, to continue after "
                  "the last finished epoch)", file=sys.stderr, flush=True)
            return 128 + int(e.sigval)


def report_failure(failures: dict) -> int:
    """The exit status of a failed job, said in one line unless the failing rank said it,
    whichever failure torchrun happened to see first: a rank's own error (bad input: it
    printed its line) wins over the ranks torchrun stopped because of it (SIGTERM: 143 or
    -15) or that lost it as a peer (75); then a rank killed by another signal is named (the
    survivor may notice the lost peer before torchrun notices the death); else a rank that
    only lost its peers gets the line it did not print."""
    again = ("rerun the same command (a scratch or finetune run: with --resume, to continue "
             "from the last finished epoch's checkpoint)")
    stopped = (DistributedFailure.exit_code, 128 + signal.SIGTERM, -signal.SIGTERM)
    own = [r for r, f in failures.items() if f.exitcode > 0 and f.exitcode not in stopped]
    if own:
        return failures[min(own, key=lambda r: failures[r].timestamp)].exitcode
    killed = sorted(r for r, f in failures.items() if f.exitcode < 0)
    killed = [r for r in killed if failures[r].exitcode != -signal.SIGTERM] or killed
    if killed:
        failure = failures[killed[0]]
        print(f"imgrec: error: rank {killed[0]} died ({failure.signal_name()}); torchrun "
              f"stopped the other ranks: {again}", file=sys.stderr, flush=True)
        return 128 - failure.exitcode
    rank = min(failures, key=lambda r: failures[r].timestamp)
    if failures[rank].exitcode == DistributedFailure.exit_code:
        print(f"imgrec: error: rank {rank} lost contact with the other ranks (one died or "
              f"dropped off the network); torchrun stopped them: {again}", file=sys.stderr,
              flush=True)
    return failures[rank].exitcode


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
