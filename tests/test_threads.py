"""The training thread governor: fewer threads while other programs keep cores busy."""

from __future__ import annotations

import pytest
import torch

from imgrec.training import threads
from imgrec.training.threads import ThreadGovernor


@pytest.fixture
def machine(monkeypatch):
    """A fake clock and CPU counters: `step(seconds, others, own)` advances them."""
    state = {"t": 100.0, "busy": 1000.0, "own": 10.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: state["t"])
    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: state["busy"])
    monkeypatch.setattr(threads, "_own_seconds", lambda: state["own"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("IMGREC_THREADS", raising=False)
    before = torch.get_num_threads()

    def step(seconds: float, others: float, own: float) -> None:
        state["t"] += seconds
        state["own"] += own * seconds
        state["busy"] += (others + own) * seconds

    yield step
    torch.set_num_threads(before)


def test_a_busy_core_is_given_up_and_taken_back(machine):
    torch.set_num_threads(2)
    gov = ThreadGovernor(torch.device("cpu"), cores=2)
    assert gov.active and gov.threads == 2
    machine(3.0, others=1.0, own=1.0)  # another program keeps one core busy
    gov.tick()
    assert gov.threads == 1 and torch.get_num_threads() == 1
    assert "training on 1 thread" in gov.take_notes()[0]
    machine(3.0, others=0.4, own=1.0)  # between the thresholds: no flapping
    gov.tick()
    assert gov.threads == 1
    machine(3.0, others=0.0, own=1.0)  # it went away
    gov.tick()
    assert gov.threads == 2 and torch.get_num_threads() == 2


def test_a_quiet_machine_keeps_every_core_and_ticks_are_cheap(machine):
    torch.set_num_threads(2)
    gov = ThreadGovernor(torch.device("cpu"), cores=2)
    machine(0.5, others=2.0, own=0.0)  # within INTERVAL: not even looked at
    gov.tick()
    assert gov.threads == 2
    machine(3.0, others=0.1, own=2.0)
    gov.tick()
    assert gov.threads == 2 and not gov.take_notes()


@pytest.mark.parametrize("env", ["OMP_NUM_THREADS", "IMGREC_THREADS"])
def test_an_explicit_thread_count_turns_it_off(machine, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    gov = ThreadGovernor(torch.device("cpu"), cores=2)
    machine(3.0, others=2.0, own=0.0)
    gov.tick()
    assert not gov.active
    if env == "IMGREC_THREADS":
        assert torch.get_num_threads() == 1


def test_restore_gives_the_caller_its_thread_count_back(machine):
    torch.set_num_threads(2)
    gov = ThreadGovernor(torch.device("cpu"), cores=2)
    machine(3.0, others=1.5, own=0.5)
    gov.tick()
    assert torch.get_num_threads() == 1
    gov.restore()
    assert torch.get_num_threads() == 2
