"""`imgrec.train`: the one-line Python API, with more beneath it for those who need it.

    imgrec.train("mnist")                                   # the recipe decides everything
    imgrec.train("photos/", model="efficientnet_lite0", epochs=5)
    imgrec.train((x, y), model=my_module, callbacks=[cb])   # arrays, your own nn.Module

`data` is a built-in name, a folder or CSV path, NumPy arrays `(x, y)` or a torch Dataset of
`(image, label)` items; `model` a registry or timm name or an `nn.Module`; options are
TrainConfig's fields (the same as `imgrec train`'s flags).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import ImgrecError
from .config import TrainConfig
from .plan import RunPlan, make_plan
from .runners import TrainResult, run_plan


def plan(data: Any, model: Any = None, **options: Any) -> RunPlan:
    """Every choice of a run, settled (data loaded, recipe applied) but nothing trained."""
    module = model if _is_module(model) else None
    source = None if isinstance(data, str | Path) else data
    if source is not None:
        options.setdefault("data_name", "arrays" if isinstance(data, tuple) else "dataset")
    name = str(options.pop("data_name", data))
    try:
        cfg = TrainConfig(data=name, model=None if module is not None else model, **options)
    except TypeError as e:  # an option TrainConfig does not have
        raise ImgrecError(f"imgrec.train: {e}", "see imgrec.training.TrainConfig") from None
    return make_plan(cfg, source, module)


#: the hooks a callback may have (imgrec.training.callbacks.Callback's)
CALLBACK_HOOKS = ("on_train_begin", "on_extract", "on_epoch_begin", "on_batch_end",
                  "on_epoch_end", "on_train_end", "on_note")


def train(data: Any, model: Any = None, callbacks: Any = (), **options: Any) -> TrainResult:
    """Train a classifier and write its bundle; returns TrainResult (.bundle, .history,
    .test_metrics). `callbacks`: objects with any of the hooks of
    imgrec.training.callbacks.Callback (on_epoch_end, on_batch_end, on_train_end...), a list
    of them or one alone."""
    callbacks = checked_callbacks(callbacks)
    with kept_random_state():
        return run_plan(plan(data, model, **options), callbacks)


@contextlib.contextmanager
def kept_random_state():
    """The caller's random generators (Python's, NumPy's, torch's) as they were: a run seeds
    them all for its own reproducibility, and a notebook's next np.random.rand() went on
    from seed 0."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def checked_callbacks(callbacks: Any) -> list[Any]:
    """The callbacks as a list, each checked now, not epochs later: a typo'd list
    ([EarlyStop] for [EarlyStop()], [1]) or a misspelled hook (`on_epoch_ends`, never called)."""
    import difflib

    if callbacks is None:
        return []
    if _hooked(callbacks) or isinstance(callbacks, type):
        callbacks = [callbacks]  # one callback alone
    callbacks = list(callbacks)  # (a generator would be used up by the checks)
    for cb in callbacks:
        if isinstance(cb, type) or not _hooked(cb):
            raise ImgrecError(f"callbacks: {cb!r:.80} is no callback object (one with any of "
                              f"{', '.join(CALLBACK_HOOKS)})",
                              "pass instances, e.g. callbacks=[MyCallback()]")
        for name in dir(cb):
            if name.startswith("on_") and name not in CALLBACK_HOOKS and \
                    callable(getattr(cb, name, None)):
                near = difflib.get_close_matches(name, CALLBACK_HOOKS, n=1)
                raise ImgrecError(f"callbacks: {type(cb).__name__}.{name} is no hook, so it "
                                  "would never be called" + (f" (did you mean {near[0]}?)"
                                                             if near else ""),
                                  f"the hooks: {', '.join(CALLBACK_HOOKS)}")
    return callbacks


def _hooked(obj: Any) -> bool:
    """Whether `obj` has any of the callback hooks."""
    return any(callable(getattr(obj, h, None)) for h in CALLBACK_HOOKS)


def _is_module(model: Any) -> bool:
    if model is None or isinstance(model, str):
        return False
    try:
        from torch import nn
    except ImportError:
        return False
    if not isinstance(model, nn.Module):
        raise ImgrecError(f"model must be a name or a torch nn.Module, not "
                          f"{type(model).__name__}")
    return True
