"""ONNX export: the fast, torch-free inference engine's input. The network is exported with
a dynamic batch axis and checked against PyTorch on the same input before it is trusted."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import EXPORT_KEY, serving_onnx_path
from .errors import InputError, ModelError


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
        raise ModelError(f"cannot export this network to ONNX ({type(e).__name__}: "
                         f"{first_line(e)})") from None
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


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line, shortened: the TorchScript exporter puts whole graphs in
    its messages, and a user needs the reason, not the dump."""
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- bundles ------------------------------------------------------------------------------

ONNX_INT8_FILE = "model.int8.onnx"
#: the largest probability difference between ONNX and PyTorch on real photos that an export
#: may show (float32 exports measure 1e-7 to 1e-6)
PARITY_TOLERANCE = 1e-4
@dataclass
class ExportResult:
    """What `export_bundle` wrote, and how closely the exports agree with PyTorch."""

    bundle: Any
    onnx: Path
    max_abs_diff: float  # ONNX vs PyTorch probabilities on real photos
    int8: Path | None = None
    int8_max_abs_diff: float | None = None  # int8 vs float32 ONNX probabilities
    int8_top1_agreement: float | None = None
    serve_file: str = "model.onnx"

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle.path), "onnx": str(self.onnx),
                "max_abs_diff": self.max_abs_diff, "int8": str(self.int8) if self.int8 else None,
                "int8_max_abs_diff": self.int8_max_abs_diff,
                "int8_top1_agreement": self.int8_top1_agreement, "serve_file": self.serve_file}


def _photo_batch(contract, photos: list[str | Path] | None = None) -> np.ndarray:
    """Real photos through the bundle's own contract (uint8 N x C x H x W): the check and the
    int8 calibration data. Default: the sample photos shipped with imgrec, plus their mirror
    images."""
    from .contract import load_input
    from .predict import sample_photos

    sources = list(photos or sample_photos())
    pixels = np.stack([load_input(s, contract) for s in sources])
    if photos is None:
        pixels = np.concatenate([pixels, pixels[..., ::-1]])
    return np.ascontiguousarray(pixels)


def _onnx_probs(path: Path, x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    import onnxruntime as ort

    from .predict import softmax

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return softmax(session.run(None, {name: x.astype(np.float32)})[0], temperature)


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantization (QDQ, per-channel 7-bit weights) with ONNX Runtime, calibrated
    on real photos. Measured on EfficientNet-Lite0: dynamic quantization, or 8-bit weights
    (which saturate in the u8 x s8 kernels of CPUs without VNNI), flip the top-1 label of a third
    of the sample photos; per-channel reduced-range weights keep all of them."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calibration[i : i + 1]}
                               for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    dst = Path(dst)
    pre = dst.with_name(f".{dst.name}.pre.onnx")
    tmp = dst.with_name(f".{dst.name}.tmp")
    logging.disable(logging.WARNING)  # the quantizer logs harmless per-tensor notes
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    except Exception as e:
        raise ModelError(f"int8 quantization failed ({type(e).__name__}: {e})",
                         "serve the float32 model.onnx instead (drop --int8)") from None
    finally:
        logging.disable(logging.NOTSET)
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


def export_bundle(model, fmt: str = "onnx", int8: bool = False, opset: int = 17,
                  photos: list[str | Path] | None = None, network: Any = None) -> ExportResult:
    """Write model.onnx (and with `int8` model.int8.onnx) into a bundle, or into the cached
    bundle of a pretrained name, check it against PyTorch on real photos, and record in
    imgrec.json which file serving runs. `network`: the bundle's network already in memory
    (one imgrec cannot rebuild: a caller's own nn.Module)."""
    from .network import load_model
    from .zoo import open_bundle

    if fmt != "onnx":
        raise InputError(f"unknown export format {fmt!r}", "the format is onnx")
    try:
        import torch  # noqa: F401 (a clear line when it is missing)
    except ImportError:
        raise ModelError("exporting needs PyTorch, which is not installed",
                         "pip install 'imgrec[train]', or export on the training machine and "
                         "copy the bundle") from None
    bundle = open_bundle(model, need_weights=network is None)
    contract = bundle.preprocess
    net = (network.cpu().eval() if network is not None else load_model(bundle))
    shape = (contract.channels, contract.input_size, contract.input_size)
    onnx_path = export_onnx(net, bundle.onnx_path, shape, opset)

    x, got, diff = check_parity(bundle, net, onnx_path, photos)
    result = ExportResult(bundle, onnx_path, diff)
    info: dict[str, Any] = {"format": "onnx", "opset": opset, "onnx": onnx_path.name,
                            "max_abs_diff": diff, "serve": onnx_path.name}
    int8_path = bundle.path / ONNX_INT8_FILE
    if int8:
        quantize_int8(onnx_path, int8_path, x)
        q = _onnx_probs(int8_path, x, bundle.temperature)
        result.int8 = int8_path
        result.int8_max_abs_diff = float(np.abs(q - got).max())
        result.int8_top1_agreement = float((q.argmax(1) == got.argmax(1)).mean())
        result.serve_file = int8_path.name
        info.update(int8=int8_path.name, int8_max_abs_diff=result.int8_max_abs_diff,
                    int8_top1_agreement=result.int8_top1_agreement, serve=int8_path.name)
    else:
        int8_path.unlink(missing_ok=True)  # an old int8 file would no longer match
    bundle.extra[EXPORT_KEY] = info
    bundle.write_meta()
    return result


def check_parity(bundle, net, onnx_path: Path, photos: list[str | Path] | None = None):
    """The check every model.onnx passes: its probabilities against the PyTorch network's on
    real photos through the bundle's contract, at most PARITY_TOLERANCE apart, else the file
    is removed and ModelError raised. (normalised photos, ONNX probabilities, difference)"""
    import torch

    from .predict import softmax

    x = bundle.preprocess.normalize(_photo_batch(bundle.preprocess, photos))
    with torch.no_grad():
        expected = softmax(net(torch.from_numpy(x)).numpy(), bundle.temperature)
    got = _onnx_probs(onnx_path, x, bundle.temperature)
    diff = float(np.abs(got - expected).max())
    if diff > PARITY_TOLERANCE:
        Path(onnx_path).unlink(missing_ok=True)
        raise ModelError(f"the ONNX export disagrees with PyTorch on real photos (max "
                         f"probability difference {diff:.2e})")
    return x, got, diff


def adopt_onnx(bundle, onnx_file: Path, network: Any, opset: int = 17) -> ExportResult:
    """Make an ONNX file built another way (training composes a features-mode network from
    the backbone's cached export and its head) the bundle's model.onnx, after export_bundle's
    check against the PyTorch `network`, and record it as export_bundle does."""
    os.replace(onnx_file, bundle.onnx_path)
    _, _, diff = check_parity(bundle, network.cpu().eval(), bundle.onnx_path)
    (bundle.path / ONNX_INT8_FILE).unlink(missing_ok=True)  # it would no longer match
    bundle.extra[EXPORT_KEY] = {"format": "onnx", "opset": opset, "onnx": bundle.onnx_path.name,
                                "max_abs_diff": diff, "serve": bundle.onnx_path.name}
    bundle.write_meta()
    return ExportResult(bundle, bundle.onnx_path, diff)


def ensure_onnx(model, warn=None):
    """The bundle to serve, exported first when it has no ONNX file yet (that step needs
    PyTorch; serving itself never does). When the network cannot be exported, `warn` gets one
    line and the bundle is returned without model.onnx: the server then runs it in PyTorch."""
    from .zoo import open_bundle

    bundle = open_bundle(model, need_weights=False)
    if serving_onnx_path(bundle).is_file():
        return bundle
    try:
        export_bundle(model)
    except ModelError as e:
        if warn is None or not torch_available():
            raise
        warn(f"{e}; serving it with PyTorch instead (slower, and it needs torch installed)")
    return open_bundle(model, need_weights=False)


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
