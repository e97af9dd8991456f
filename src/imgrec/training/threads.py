"""Training threads that yield to the rest of the machine.

PyTorch's CPU operators split each step across one OpenMP thread per core and wait for all of
them. When another program keeps a core busy, every operator waits for the thread that the
kernel has put behind it: measured on 2 cores with one busy-looping process beside it, a
fast-cnn step took 80.6 ms on 2 threads and 18.2 ms on 1 (10.3 ms on 2 threads when the machine
is quiet). So every couple of seconds the loop reads how much CPU the other processes used
(Linux /proc/stat minus this process's own time) and trains on the cores they leave free,
returning to every core when they go. An explicit OMP_NUM_THREADS or IMGREC_THREADS (torchrun
and `--nproc` set the former) pins the count and turns this off.

Also here: the CPU's feature flags (`cpu_flags`), which decide bfloat16 autocast and the
default CIFAR-10 recipe.
"""

from __future__ import annotations

import math
import os
import time

import torch

#: seconds between two looks at the machine
INTERVAL = 2.0
#: cores' worth of other processes' CPU use that takes a thread away (hysteresis below)
TAKE_AT = 0.6
GIVE_BACK_BELOW = 0.3


def _machine_busy_seconds() -> float | None:
    """CPU-seconds all processes have spent since boot (user + nice + system + irq), or None
    where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """`tick()` once a step; it changes torch's thread count at most every INTERVAL seconds.
    `notes` collects what it did, for the run's log."""

    def __init__(self, device: torch.device, cores: int):
        self.cores = cores
        self.initial = self.threads = torch.get_num_threads()  # before any pin: restore()
        pinned = os.environ.get("OMP_NUM_THREADS") or os.environ.get("IMGREC_THREADS")
        if os.environ.get("IMGREC_THREADS"):
            self.threads = max(1, int(os.environ["IMGREC_THREADS"]))
            torch.set_num_threads(self.threads)
        self.active = (
            device.type == "cpu"
            and not pinned
            and cores > 1
            and _machine_busy_seconds() is not None
        )
        self.notes: list[str] = []
        self._mark()

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def restore(self) -> None:
        """The thread count the run started with (a Python caller's process goes on)."""
        if torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)
        self.threads = self.initial

    def _mark(self) -> None:
        self.t = time.monotonic()
        self.busy = _machine_busy_seconds() or 0.0
        self.own = _own_seconds()

    def others(self) -> float:
        """Cores' worth of CPU the other processes used since the last look."""
        elapsed = time.monotonic() - self.t
        if elapsed <= 0:
            return 0.0
        busy = (_machine_busy_seconds() or 0.0) - self.busy
        return max(0.0, busy - (_own_seconds() - self.own)) / elapsed

    def wanted(self, others: float) -> int:
        """Threads for the cores the others leave. A core is given up when they use
        TAKE_AT of it and taken back when they use under GIVE_BACK_BELOW, so a short burst of
        someone else's work does not flip the count back and forth."""
        fewer = max(1, self.cores - math.floor(others + 1 - TAKE_AT))
        more = max(1, self.cores - math.floor(others + 1 - GIVE_BACK_BELOW))
        if fewer < self.threads:
            return fewer
        return max(more, self.threads)

    def tick(self) -> None:
        if not self.active or time.monotonic() - self.t < INTERVAL:
            return
        others = self.others()
        want = self.wanted(others)
        if want != self.threads:
            torch.set_num_threads(want)
            self.notes.append(
                f"other programs used {others:.1f} of {self.cores} cores: "
                f"training on {want} thread{'s' if want > 1 else ''}"
            )
            self.threads = want
        self._mark()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS,
    Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
