"""The bundle's network in PyTorch: build it from the registry, save and load its weights
(safetensors: loading a bundle runs no code), and run it as a prediction engine.

The torch side of the bundle. `imgrec.bundle` (metadata) and `imgrec.predict` (ONNX Runtime)
stay torch-free; predict reaches this module only when a bundle has no ONNX file or PyTorch
is asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .bundle import FORMAT, ONNX_INT8_FILE, Bundle
from .errors import BundleError
from .files import being_written

#: the architecture name of a network the caller built (`imgrec.train(data, model=module)`)
CUSTOM_ARCHITECTURE = "custom"


def save_bundle(bundle: Bundle, model: Any) -> Bundle:
    """Write weights (safetensors) and metadata into bundle.path, each atomically; imgrec.json
    records the weights' size and SHA-256."""
    from safetensors.torch import save

    bundle.path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The weights change: an old export (float32 or int8) would disagree with them.
    for stale in (bundle.onnx_path, bundle.path / ONNX_INT8_FILE):
        stale.unlink(missing_ok=True)
    bundle.commit_weights(save(state, metadata={"format": FORMAT}))
    return bundle


def load_model(bundle: Bundle):
    """Build the bundle's network and load its weights (safetensors, no pickle)."""
    from safetensors.torch import load_file

    from .models import build_model

    if bundle.architecture["name"] == CUSTOM_ARCHITECTURE:
        cls = bundle.architecture.get("args", {}).get("class", "a Python class")
        raise BundleError(
            f"{bundle.path}: its network ({cls}) was built in Python; imgrec cannot rebuild it",
            "predict, evaluate and serve run its model.onnx; to reload it in PyTorch, register "
            "its builder with imgrec.models.register_model and train with model='NAME'",
        )
    if not bundle.weights_path.is_file():  # a serve-only copy: model.onnx without weights
        only_int8 = not bundle.onnx_path.is_file()
        raise BundleError(f"{bundle.weights_path.name} is missing from {bundle.path}",
                          "it holds model.int8.onnx alone: add --int8" if only_int8 else
                          "PyTorch needs the weights; the ONNX engines do not")
    model = build_model(bundle.architecture["name"], **bundle.architecture.get("args", {}))
    try:
        state = load_file(str(bundle.weights_path))
    except Exception as e:
        raise BundleError(f"{bundle.weights_path}: unreadable weights ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape
        busy = being_written(bundle.path)  # a training replaced them since imgrec.json was read
        if busy is not None:
            raise BundleError(busy.message, busy.hint) from None
        raise BundleError(
            f"{bundle.path}: weights do not fit the architecture "
            f"({str(e).splitlines()[-1].strip()})",
            "the bundle is damaged or was written by another version; retrain it",
        ) from None
    if missing or unexpected:
        raise BundleError(
            f"{bundle.path}: weights do not fit the architecture "
            f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)",
            "the bundle is damaged or was written by another version; retrain it",
        )
    model.eval()
    _check_outputs(model, bundle)
    return model


def _check_outputs(model: Any, bundle: Bundle) -> None:
    """The network gives one logit per class of the bundle (else predict would index past
    the class list): one forward pass of a blank image."""
    c = bundle.preprocess
    with torch.inference_mode():
        out = model(torch.zeros(1, c.channels, c.input_size, c.input_size))
    outputs = int(out.shape[-1]) if out.ndim == 2 else None
    if outputs != len(bundle.classes):
        raise BundleError(
            f"{bundle.weights_path}: the network gives {outputs or tuple(out.shape)} outputs but "
            f"the bundle lists {len(bundle.classes)} classes",
            "the bundle is damaged or was changed by hand: restore it, or retrain it",
        )


class TorchEngine:
    """Runs the bundle's network in PyTorch (training-side machines, GPU)."""

    name = "torch"

    def __init__(self, bundle: Bundle | None, device: Any = None, model: Any = None,
                 threads: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and self.device.type == "cpu":  # as ONNX Runtime's (benchmark --threads)
            torch.set_num_threads(threads)
        self.model = (model if model is not None else load_model(bundle)).to(self.device).eval()
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_model(cls, model: torch.nn.Module, device: Any = None) -> TorchEngine:
        """A network in memory (training scores its test split with it, before any export)."""
        return cls(None, device, model)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            if self.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            return self.model(t).float().cpu().numpy()
