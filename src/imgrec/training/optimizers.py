"""torch's optimizers, minus the 0.9 s import of torch._dynamo that their first use costs.

torch wraps `Optimizer.step`, `zero_grad`, `add_param_group`, `state_dict` and
`load_state_dict` so that torch.compile leaves them alone; each wrapper imports torch._dynamo on
first use, even in eager mode. That import was 0.9 s of a 13 s `imgrec train mnist`, on every
training run. imgrec never compiles its training step, so its optimizers call the wrapped
methods themselves (`__wrapped__`); the arithmetic is torch's own. Where a torch release
stops exposing `__wrapped__`, the classes fall back to torch's methods unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ImgrecError


def _unwrapped(method: Callable) -> Callable:
    """The function torch's dynamo-guard decorator wraps (the method itself if none)."""
    return getattr(method, "__wrapped__", method)


def _eager(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of `base` whose guarded methods run without the dynamo wrappers; `step`
    runs under no_grad, as torch's wrapper does for a non-differentiable optimizer."""
    step = _unwrapped(base.step)
    opt = torch.optim.Optimizer

    def eager_step(self, closure=None) -> Any:
        if self.defaults.get("differentiable"):
            return base.step(self, closure)
        with torch.no_grad():
            return step(self, closure)

    namespace = {
        "__doc__": f"torch.optim.{base.__name__}, stepping without importing torch._dynamo.",
        "__module__": __name__,
        "step": eager_step,
        "zero_grad": _unwrapped(opt.zero_grad),
        "add_param_group": _unwrapped(opt.add_param_group),
        "state_dict": _unwrapped(opt.state_dict),
        "load_state_dict": _unwrapped(opt.load_state_dict),
    }
    return type(base.__name__, (base,), namespace)


AdamW = _eager(torch.optim.AdamW)
Adam = _eager(torch.optim.Adam)
SGD = _eager(torch.optim.SGD)
RMSprop = _eager(torch.optim.RMSprop)


def optimizer_for(name: str, params, lr: float, weight_decay: float,
                  fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer a recipe or --optimizer names. `fused` (a recipe's choice): AdamW, Adam
    and SGD update every parameter in one kernel a step where the parameters allow it (on the
    CPU or CUDA), instead of torch's default multi-tensor loop. A tiny network's step is
    short enough for that loop's overhead to count (0.3 of 7.5 ms for MNIST's fast-cnn on 2
    CPU cores); the arithmetic differs in rounding, so recipes opt in where it was measured."""
    params = list(params)
    extra = {"fused": True} if fused and name != "rmsprop" and _fusable(params) else {}
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay, **extra)
    if name == "adam":
        return Adam(params, lr=lr, **extra)
    if name == "sgd":
        return SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                   **extra)
    if name == "rmsprop":
        return RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ImgrecError(f"unknown optimizer {name!r}", "choose adamw, adam, sgd or rmsprop")


def _fusable(params: list) -> bool:
    """Whether torch's fused optimizers take these parameters (or param groups): floating
    point, on the CPU or CUDA."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda")
                                 for t in tensors)
