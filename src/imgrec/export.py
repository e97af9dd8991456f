"""ONNX export: the fast, torch-free inference engine's input. The network is exported with
a dynamic batch axis and checked against PyTorch on the same input before it is trusted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ModelError


def export_onnx(model, path: Path, input_shape: tuple[int, int, int], opset: int = 17,
                check: bool = True, atol: float = 1e-3) -> Path:
    """Export a torch module taking N x C x H x W float32 to `path` (atomically) and, when
    `check`, verify ONNX Runtime's output against PyTorch's on a random batch."""
    import torch

    model = model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    example = torch.randn(2, *input_shape)
    try:
        torch.onnx.export(
            model, (example,), str(tmp), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
            dynamo=False,
        )
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot export this network to ONNX ({type(e).__name__}: {e})") from None
    if check:
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(example).numpy()
        got = session.run(None, {"input": example.numpy()})[0]
        if not np.allclose(got, expected, atol=atol, rtol=1e-3):
            tmp.unlink(missing_ok=True)
            raise ModelError(
                f"the ONNX export disagrees with PyTorch (max difference "
                f"{float(np.abs(got - expected).max()):.2e})")
    os.replace(tmp, path)
    return path
