"""imgrec's optimizers: torch's arithmetic, without torch._dynamo's 0.9 s import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from imgrec.training import optimizers


def _train_steps(make, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = make(net.parameters())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    opt.load_state_dict(opt.state_dict())  # the checkpoint round trip works
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop"])
def test_same_arithmetic_as_torch(name):
    ours = _train_steps(lambda p: optimizers.optimizer_for(name, p, 1e-2, 1e-3))
    kinds = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-3),
             "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
             "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                              weight_decay=1e-3),
             "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, weight_decay=1e-3)}
    theirs = _train_steps(kinds[name])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert isinstance(optimizers.optimizer_for(name, [torch.zeros(1, requires_grad=True)],
                                               0.1, 0.0), torch.optim.Optimizer)


def test_training_never_imports_dynamo():
    """A whole step with a one-cycle schedule, as the engine runs it, in a fresh process."""
    code = (
        "import sys, torch\n"
        "from imgrec.training.engine import one_cycle\n"
        "from imgrec.training.optimizers import optimizer_for\n"
        "net = torch.nn.Linear(3, 2)\n"
        "opt = optimizer_for('adamw', net.parameters(), 0.1, 0.01)\n"
        "sched = one_cycle(opt, 0.1, 10)\n"
        "net(torch.randn(4, 3)).sum().backward()\n"
        "opt.step(); sched.step(); opt.zero_grad()\n"
        "opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_steps_like_the_loop(name):
    """A recipe's fused_optimizer: one kernel a step, the same update up to rounding."""
    fused = _train_steps(lambda p: optimizers.optimizer_for(name, p, 1e-2, 1e-3, fused=True))
    loop = _train_steps(lambda p: optimizers.optimizer_for(name, p, 1e-2, 1e-3))
    for a, b in zip(fused, loop, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    opt = optimizers.optimizer_for(name, [torch.zeros(2, requires_grad=True)], 0.1, 0.0,
                                   fused=True)
    assert opt.defaults["fused"] is True


def test_fused_falls_back_where_torch_has_none():
    """RMSprop has no fused kernel, nor do integer tensors: the loop runs instead."""
    rms = optimizers.optimizer_for("rmsprop", [torch.zeros(2, requires_grad=True)], 0.1, 0.0,
                                   fused=True)
    assert not rms.defaults.get("fused")
    assert not optimizers._fusable([torch.zeros(2, dtype=torch.long)])
    assert optimizers._fusable([{"params": [torch.zeros(2)]}])
