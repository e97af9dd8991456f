"""ONNX export: the fast, torch-free inference engine's input. The network is exported with
a dynamic batch axis and checked against PyTorch on the same input before it is trusted."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    EXPORT_KEY,
    ONNX_FILE,
    ONNX_INT8_FILE,
    file_digest,
    serving_onnx_path,
)
from .errors import InputError, ModelError
from .files import private_name

#: torch.onnx.export keeps global state ("GLOBALS.in_onnx_export"): two threads exporting at
#: once (two studio projects training) failed; one export at a time in a process
_EXPORTING = threading.Lock()


def export_onnx(model, path: Path, input_shape: tuple[int, int, int], opset: int = 17,
                check: bool = True, atol: float = 1e-3) -> Path:
    """Export a torch module taking N x C x H x W float32 to `path` (atomically) and, when
    `check`, verify ONNX Runtime's output against PyTorch's on a random batch."""
    import torch

    model = model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_name(path, "tmp")
    example = torch.randn(2, *input_shape)
    try:
        with _EXPORTING, warnings.catch_warnings():
            # the exporter's note that it left a strided Slice unfolded (a padded
            # space-to-depth stem): an optimisation it skipped, not a fault in the file
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                model, (example,), str(tmp), input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=opset, dynamo=False,
            )
    except OSError as e:  # the folder, not the network: read-only, full, gone
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {tmp} ({e.strerror or first_line(e)})",
                         "export into a folder you can write to (copy the bundle)") from None
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot export this network to ONNX ({type(e).__name__}: "
                         f"{first_line(e)})") from None
    except BaseException:  # Ctrl-C: no half-written file left behind (13 MB for Lite0)
        tmp.unlink(missing_ok=True)
        raise
    try:
        if check:
            _check_export(model, tmp, example, atol)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_export(model, onnx_file: Path, example, atol: float) -> None:
    """ONNX Runtime's output for `example` against PyTorch's."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(example).numpy()
    got = session.run(None, {"input": example.numpy()})[0]
    if not np.allclose(got, expected, atol=atol, rtol=1e-3):
        raise ModelError(f"the ONNX export disagrees with PyTorch (max difference "
                         f"{float(np.abs(got - expected).max()):.2e})")


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line, shortened: the TorchScript exporter puts whole graphs in
    its messages, and a user needs the reason, not the dump."""
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- bundles ------------------------------------------------------------------------------

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
    int8_calibration: str | None = None  # what it was calibrated on, in words
    int8_agreement_images: int | None = None
    int8_held_out: bool | None = None  # agreement on images not calibrated on
    serve_file: str = "model.onnx"
    #: without --int8: what became of an earlier model.int8.onnx (kept or removed), if any
    int8_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle.path), "onnx": str(self.onnx),
                "max_abs_diff": self.max_abs_diff, "int8": str(self.int8) if self.int8 else None,
                "int8_max_abs_diff": self.int8_max_abs_diff,
                "int8_top1_agreement": self.int8_top1_agreement,
                "int8_calibration": self.int8_calibration,
                "int8_agreement_images": self.int8_agreement_images,
                "int8_held_out": self.int8_held_out, "serve_file": self.serve_file,
                "int8_note": self.int8_note}


def _photo_batch(contract, photos: list[str | Path] | None = None) -> np.ndarray:
    """Real photos through the bundle's own contract (uint8 N x C x H x W) for the parity
    check. Default: the sample photos shipped with imgrec, plus their mirror images."""
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


#: how model.int8.onnx is made, chosen by measurement on EfficientNet-Lite0 on an AVX-512 VNNI
#: CPU (benchmarks/int8.py: 621 photos, calibrated on the sample photos as `imgrec export
#: imagenet --int8` is; the speed ratio is +-0.2x on 2 shared cores, and agreement moves by
#: 1-2 points when preprocessing changes pixels by a level or two: many of these photos' top
#: two ImageNet classes are within 1% of each other):
#: - 8-bit per-channel weights: reduce_range=True (7-bit, for CPUs without VNNI) agreed with
#:   float32 on 79% of 200 held-out photos against 87%;
#: - the first 3 convolutions (the stem and the first block) and the classifier in float32:
#:   90.8-91.0% top-1 agreement at 2.0-2.4x float32's images/s; 6 convolutions and the global
#:   pooling 92.3% but only 1.67-1.8x, 9 convolutions 92.4-92.9% at 1.65-1.9x (too close to
#:   the 1.6x this export must give); whole-model int8 88-89% (on 200 photos);
#: - ranges: the 99.99th percentile of the calibration histogram (min/max and the 99.999th
#:   0.5-1 point lower; entropy lower still; the 99.9th 87.8%);
#: - calibration (a pretrained model, no training data): 16 views of each of the 6 offline
#:   photos (`photo_views`, 96 images) 91.6% on the 621 photos against 91.0% for the 3 sample
#:   photos and mirrors; 32 views 92.0% (quantizing 3x slower); adding scikit-image's photos
#:   (8 views each, 216 images) 92.0% (91.8% on the 600 cats and dogs it never saw);
#: - the depthwise convolutions in float32 (INT8_FLOAT_DEPTHWISE): 76.2%, with no float
#:   first convolutions 65.9%: worse, not better; the last 1x1 convolution too: 91.6%, no gain.
#: - what flips them (float32 weights, int8 activations: 97% on 500 photos; int8 weights,
#:   float32 activations: 91.6%): the weights' rounding, whose mean effect on each channel
#:   `bias_correct` takes out of the bias: 91.6% -> 98.0% with float32 activations, and with
#:   int8 activations 92.2% -> 96.4% on the 500 cats-dogs-mini training photos, 88% -> 97% on
#:   its 100 validation photos, 20 of scikit-image's 21 (the same one flips with every setting
#:   tried: its top two classes are 0.13 logits apart); 6 float32 convolutions with it 97.2%,
#:   97%, 20/21 at 1.78x (noisy), none 94.2%, 94%, 19/21 at 2.2x; with it 99.999th percentile
#:   95.6%; min/max ranges 96%; per-channel bias correction of the activations' mean shifts
#:   (measured on the int8 model, all layers at once or layer by layer) lower, not higher;
#:   32 views of each offline photo (CALIBRATION_VIEWS) instead of 16: 97.4% of the 500,
#:   98% of the 100, 20/21 (97.5% of the 600 cats and dogs; quantizing ~1.3-1.7x longer).
#: Post-training int8 of the 1000-class model reaches ~97.4% agreement (its close top-two
#: classes flip); a Lite0 transfer bundle (2 classes, calibrated on its training data) agrees
#: with float32 on 99.7% of the same 621 photos at 2.2x (its training set was built from the
#: 600; 100% of the 21 unseen scikit-image photos; benchmarks/int8.py --transfer). Export:
#: `imgrec export imagenet --int8` 61-66 s on 2 busy cores (20 s with the 6-image set).
INT8_FLOAT_FIRST_CONVS = 3
INT8_PERCENTILE = 99.99
INT8_FLOAT_POOLING = False
INT8_FLOAT_DEPTHWISE = False
#: bias correction (`bias_correct`): 91.6% -> 96.5% top-1 agreement on the same 621 photos
INT8_BIAS_CORRECTION = True
#: calibration images taken from the training split, and held-out images for the agreement
CALIBRATION_LIMIT = 128
AGREEMENT_LIMIT = 256
#: views of each offline photo in a pretrained model's calibration set (`photo_views`): 32
#: agree with float32 on ~1 point more photos than 16 once the weights are bias-corrected
CALIBRATION_VIEWS = 32


@dataclass
class Calibration:
    """The images int8 quantization is calibrated on, and images it was not, for the agreement
    with float32 (uint8 N x C x H x W through the bundle's contract)."""

    pixels: np.ndarray
    held_out: np.ndarray | None
    source: str  # in words, for the user


def float_nodes(model_path: Path, first_convs: int | None = None,
                depthwise: bool | None = None) -> list[str]:
    """The nodes kept in float32: the first `first_convs` convolutions, the depthwise ones
    when `depthwise` (their per-channel 3x3/5x5 filters are the classic int8 error source of
    MobileNet-style networks), the activations right after each, the global pooling when
    INT8_FLOAT_POOLING, and the last Gemm/MatMul (the classifier, whose logits decide top-1
    between close classes). Defaults: INT8_FLOAT_FIRST_CONVS, INT8_FLOAT_DEPTHWISE."""
    import onnx

    first_convs = INT8_FLOAT_FIRST_CONVS if first_convs is None else first_convs
    depthwise = INT8_FLOAT_DEPTHWISE if depthwise is None else depthwise
    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    activation = {n.input[0]: n.name for n in nodes if n.op_type in ("Clip", "Relu")}
    keep: list[str] = []
    convs = 0
    for node in nodes:
        if node.op_type != "Conv":
            continue
        convs += 1
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if convs <= first_convs or (depthwise and group > 1):
            keep.append(node.name)
            if node.output[0] in activation:
                keep.append(activation[node.output[0]])
    pools = [n.name for n in nodes if INT8_FLOAT_POOLING
             and n.op_type in ("GlobalAveragePool", "Flatten")]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return keep + pools + heads[-1:]


def channel_means(model, names: list[str], calibration: np.ndarray) -> list[np.ndarray]:
    """The per-channel mean of each named N x C x H x W tensor of `model` (an onnx
    ModelProto, float32) over `calibration`, from one run with those tensors made outputs."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    sums = [0.0] * len(names)
    for i in range(0, len(calibration), 16):
        outs = session.run(names, {feed: calibration[i : i + 16]})
        sums = [s + o.reshape(*o.shape[:2], -1).mean(2).sum(0) for s, o in zip(sums, outs,
                                                                                 strict=True)]
    return [np.asarray(s, np.float64) / len(calibration) for s in sums]


def bias_correct(path: Path, calibration: np.ndarray, keep: list[str]) -> int:
    """Round the weights of every convolution not in `keep` to the per-channel symmetric int8
    grid ONNX Runtime quantizes them to (its own max|w|/127 scale, so it reproduces them
    exactly), and subtract each rounding's mean effect on the output, (Wq - W) . E[input],
    from the bias (bias correction, Nagel et al. 2019, "Data-Free Quantization"). Rounding
    shifts a channel's mean; ~50 such shifts add up and flip the top-1 of photos whose top
    two ImageNet classes are close. Rewrites `path`; returns how many were corrected."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep
             and n.input[1] in inits and len(n.input) > 2 and n.input[2] in inits]
    if not convs:
        return 0
    means = channel_means(model, [n.input[0] for n in convs], calibration)
    for node, mean in zip(convs, means, strict=True):
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        flat = w.reshape(len(w), -1)
        scale = np.abs(flat).max(1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        wq = (np.clip(np.round(flat / scale), -127, 127) * scale).reshape(w.shape)
        err = (wq - w).sum((2, 3))  # out x in/group: the kernel's error on a constant input
        group_in = err.shape[1]
        mu = mean.reshape(-1, group_in)  # the input channels each group's filters see
        shift = (err * np.repeat(mu, len(w) // len(mu), axis=0)).sum(1)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) - shift
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(wq.astype(np.float32),
                                                               node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.astype(np.float32),
                                                              node.input[2]))
    onnx.save(model, str(path))
    return len(convs)


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray,
                  first_float_convs: int | None = None, percentile: float | None = -1.0,
                  bias_correction: bool | None = None) -> Path:
    """Static int8 quantization with ONNX Runtime: QDQ, per-channel symmetric 8-bit weights
    (bias-corrected on `calibration`: `bias_correct`), uint8 activations calibrated on
    `calibration` (normalised float32 N x C x H x W), a few sensitive nodes kept in float32
    (`float_nodes`). `percentile` None: min/max ranges. Defaults: INT8_FLOAT_FIRST_CONVS,
    INT8_PERCENTILE and INT8_BIAS_CORRECTION, read at the call."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # one image a call: the histogram calibrators need equal-sized batches
            self.items = iter([{"input": calibration[i : i + 1]}
                               for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    if first_float_convs is None:
        first_float_convs = INT8_FLOAT_FIRST_CONVS
    if percentile is not None and percentile < 0:
        percentile = INT8_PERCENTILE
    if bias_correction is None:
        bias_correction = INT8_BIAS_CORRECTION
    dst = Path(dst)
    pre, tmp = private_name(dst, "pre.onnx"), private_name(dst, "tmp")
    method = CalibrationMethod.MinMax if percentile is None else CalibrationMethod.Percentile
    logging.disable(logging.WARNING)  # the quantizer logs harmless per-tensor notes
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        keep = float_nodes(pre, first_float_convs)
        if bias_correction:
            bias_correct(pre, calibration, keep)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints progress
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method,
                            nodes_to_exclude=keep,
                            extra_options={"CalibPercentile": percentile or 100.0})
        os.replace(tmp, dst)
    except Exception as e:
        _short_of_space(src, dst)
        raise ModelError(f"int8 quantization failed ({type(e).__name__}: {first_line(e)})",
                         "serve the float32 model.onnx instead (drop --int8)") from None
    finally:
        logging.disable(logging.NOTSET)
        # the quantizer's own shape-inferred copy of its input too (a full disk left it)
        for leftover in (pre, tmp, pre.with_name(f"{pre.stem}-inferred.onnx")):
            leftover.unlink(missing_ok=True)
    return dst


def _short_of_space(src: Path, dst: Path) -> None:
    """A quantization that failed for want of disk space says so (a full disk surfaced as
    the quantizer's "DecodeError: ... Wire format was corrupt" of a truncated model)."""
    import shutil

    need = 4 * Path(src).stat().st_size  # the pre-processed, inferred and quantized copies
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise InputError(f"{dst.parent}: too little free disk space to quantize ({free / 1e6:.1f}"
                         f" MB free, about {need / 1e6:.0f} MB needed)",
                         "free some space, or copy the bundle to another disk and export "
                         "there") from None


def calibration_data(bundle, data: str | None = None, seed: int = 0,
                     data_dir: str | None = None) -> Calibration:
    """Calibration images from the bundle's own training data (or `data`, a dataset as
    `imgrec train` takes it): up to CALIBRATION_LIMIT from its training split, and up to
    AGREEMENT_LIMIT held out from its validation or test split. When the data is not on this
    machine (or the bundle names none: a pretrained model), `photo_views` of the photos every
    exporting machine has (`offline_photos`), which then are the images the agreement is
    measured on."""
    from .errors import DataError, ImgrecError

    t = bundle.training
    name = data or t.get("data")
    if not data and isinstance(t.get("data_path"), str) and not Path(str(name)).exists():
        name = t["data_path"]  # the folder or CSV it trained on, from another working folder
    data_dir = data_dir or (t.get("data_dir") if not data else None)
    if isinstance(name, str) and name:
        try:
            return _dataset_calibration(bundle, name, seed, data_dir)
        except (ImgrecError, OSError) as e:
            if data and isinstance(e, DataError) and Path(data).expanduser().is_dir():
                # not a labelled dataset: calibration needs no labels, its photos will do
                return _photo_folder_calibration(bundle, Path(data).expanduser(), seed)
            if data:  # the user named it: a wrong path is an error, not a quiet fallback
                raise InputError(f"--calibration {data!r}: {first_line(e, 400)}",
                                 "give a dataset as `imgrec train` takes it, or leave "
                                 "--calibration out") from None
            why = f"the training data {name!r} is not readable here ({first_line(e, 120)})"
    else:
        why = "the bundle names no training data"
    photos = offline_photos()
    return Calibration(photo_views(bundle.preprocess, photos), None,
                       f"the sample photos of imgrec, scikit-learn and matplotlib "
                       f"({len(photos)}), {CALIBRATION_VIEWS} views (crops, mirrors) of each "
                       f"({why}); agreement measured on them, not on held-out images")


def offline_photos() -> list[Path]:
    """Natural photos on every machine that exports (the train extra brings scikit-learn and
    matplotlib): imgrec's samples, scikit-learn's two sample photos and matplotlib's Grace
    Hopper; the ones a package lacks are left out."""
    from .predict import sample_photos

    found = [Path(p) for p in sample_photos()]
    for module, names in (("sklearn.datasets", ("images/china.jpg", "images/flower.jpg")),
                          ("matplotlib", ("mpl-data/sample_data/grace_hopper.jpg",))):
        try:
            folder = Path(importlib.import_module(module).__file__).parent
        except ImportError:
            continue
        found += [folder / n for n in names if (folder / n).is_file()]
    return found


def photo_views(contract, photos: list, per_photo: int = CALIBRATION_VIEWS,
                seed: int = 0) -> np.ndarray:
    """Each photo as it is, mirrored, and `per_photo` - 2 random crops (a quarter to all of
    its area, aspect 3:4 to 4:3, half of them mirrored) through the contract: uint8 N x C x H
    x W. A pretrained model's calibration set when there is no training data: a few photos
    seen at many framings and scales cover far more of the activation ranges than the
    photos alone."""
    from PIL import Image

    from .images import MAX_PIXELS, decode_image

    rng = np.random.default_rng(seed)
    out = []
    for source in photos:
        img = decode_image(source, contract.channels, MAX_PIXELS, None)
        out += [contract.to_uint8(img), contract.to_uint8(img.transpose(Image.FLIP_LEFT_RIGHT))]
        w, h = img.size
        for k in range(per_photo - 2):
            area = w * h * rng.uniform(0.25, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            view = img.crop((x, y, x + cw, y + ch))
            out.append(contract.to_uint8(view.transpose(Image.FLIP_LEFT_RIGHT) if k % 2
                                         else view))
    return np.ascontiguousarray(np.stack(out))


def _dataset_calibration(bundle, data: str, seed: int,
                         data_dir: str | None = None) -> Calibration:
    from .data.datasets import load_dataset
    from .errors import ImgrecError

    t = bundle.training
    ds = load_dataset(data, data_dir, val_fraction=t.get("val_fraction", 0.1),
                      test_fraction=t.get("test_fraction", 0.1), seed=t.get("seed", 0))
    rng = np.random.default_rng(seed)
    pixels = _split_pixels(bundle, ds.splits["train"], CALIBRATION_LIMIT, rng)
    held, held_name = None, None
    for split in ("val", "test"):
        if split in ds.splits and len(ds.splits[split]):
            held = _split_pixels(bundle, ds.splits[split], AGREEMENT_LIMIT, rng)
            held_name = {"val": "validation", "test": "test"}[split]
            break
    if pixels is None:
        raise ImgrecError(f"no readable image in the training split of {data}")
    where = f", agreement on {len(held)} {held_name} images" if held is not None else ""
    return Calibration(pixels, held, f"{len(pixels)} training images of {data}{where}")


def _photo_folder_calibration(bundle, folder: Path, seed: int) -> Calibration:
    """A folder of photos without class folders (calibration needs no labels): up to
    CALIBRATION_LIMIT of them, drawn at random, to calibrate on, and up to AGREEMENT_LIMIT of
    the rest for the agreement."""
    from .predict import walk_images

    files = [str(f) for f in walk_images(folder)]
    order = np.random.default_rng(seed).permutation(len(files))
    cal = _decoded(bundle, [files[i] for i in order[:CALIBRATION_LIMIT]])
    held = _decoded(bundle, [files[i] for i in
                             order[CALIBRATION_LIMIT:CALIBRATION_LIMIT + AGREEMENT_LIMIT]])
    if cal is None:
        raise InputError(f"--calibration {folder}: no readable image in it",
                         "give a folder of photos like the ones the model will see")
    where = f", agreement on {len(held)} others of it" if held is not None else ""
    return Calibration(cal, held, f"{len(cal)} photos of {folder}{where}")


def _split_pixels(bundle, split, limit: int, rng) -> np.ndarray | None:
    """Up to `limit` images of a split, drawn at random, through the contract (unreadable
    files are left out)."""
    from .contract import fit_arrays

    idx = np.sort(rng.choice(len(split), size=min(limit, len(split)), replace=False))
    if split.images is not None:
        return fit_arrays(split.images[idx], bundle.preprocess)
    return _decoded(bundle, [split.paths[i] for i in idx])


def _decoded(bundle, paths: list[str]) -> np.ndarray | None:
    """The files through the bundle's contract (unreadable ones left out); None if none."""
    from .contract import load_input
    from .predict import decode_many

    decoded = decode_many(lambda p: load_input(p, bundle.preprocess), paths)
    good = [d for d in decoded if isinstance(d, np.ndarray)]
    return np.stack(good) if good else None


def export_bundle(model, fmt: str = "onnx", int8: bool = False, opset: int = 17,
                  photos: list[str | Path] | None = None, network: Any = None,
                  calibration: str | None = None, data_dir: str | None = None) -> ExportResult:
    """Write model.onnx (and with `int8` model.int8.onnx) into a bundle, or into the cached
    bundle of a pretrained name, check it against PyTorch on real photos, and record it in
    imgrec.json. Serving runs model.onnx unless asked for int8 (`imgrec serve --int8`).
    `network`: the bundle's network already in memory (one imgrec cannot rebuild: a caller's
    own nn.Module). `calibration`: a dataset to calibrate int8 on instead of the bundle's own
    training data; `data_dir`: where built-in datasets are (else as training recorded it, else
    $IMGREC_DATA)."""
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
    # damaged exports are rebuilt, not refused: that is what a damaged bundle is told to do
    bundle = open_bundle(model, need_weights=network is None, exports=False)
    contract = bundle.preprocess
    # a bad --calibration (or unreadable training data it names) fails before any writing
    cal = calibration_data(bundle, calibration, data_dir=data_dir) if int8 else None
    net = (network.cpu().eval() if network is not None else load_model(bundle))
    shape = (contract.channels, contract.input_size, contract.input_size)
    # The new file is checked beside the old one and put in place just before imgrec.json
    # records it: a failure or Ctrl+C leaves the bundle as it was, or whole and new.
    new = private_name(bundle.onnx_path, "new")
    try:
        export_onnx(net, new, shape, opset)
        _, _, diff = check_parity(bundle, net, new, photos)
        os.replace(new, bundle.onnx_path)
    finally:  # (export_onnx removes its own temporary file)
        new.unlink(missing_ok=True)
    info: dict[str, Any] = {"format": "onnx", "opset": opset, "onnx": ONNX_FILE,
                            "max_abs_diff": diff, "serve": ONNX_FILE}
    kept, removed = _int8_kept(bundle)
    bundle.extra[EXPORT_KEY] = {**info, **kept}
    bundle.write_meta()
    result = ExportResult(bundle, bundle.onnx_path, diff)
    if not int8:
        result.int8_note = ("kept: made from this same model.onnx" if kept else
                            "removed: it was made from an earlier model.onnx" if removed
                            else None)
    else:
        info.update(_export_int8(bundle, result, cal))
        bundle.extra[EXPORT_KEY] = info
        bundle.write_meta()
    return result


def _int8_kept(bundle) -> tuple[dict[str, Any], bool]:
    """The int8 record to keep after model.onnx was written again: the earlier one when its
    file is intact and was quantized from a model.onnx identical to the new one (a scratch
    network exports byte for byte the same), else nothing, and the file is removed (stale);
    and whether a file was removed."""
    from .bundle import FILES_KEY, verify_file
    from .errors import BundleError

    path = bundle.path / ONNX_INT8_FILE
    before = bundle.extra.get(EXPORT_KEY) or {}
    records = bundle.extra.get(FILES_KEY) or {}
    kept = {k: v for k, v in before.items() if k.startswith("int8")} \
        if isinstance(before, dict) else {}
    try:
        verify_file(path, records.get(ONNX_INT8_FILE) if isinstance(records, dict) else None)
        current = (path.is_file() and kept.get("int8") == ONNX_INT8_FILE
                   and kept.get("int8_source_sha256") == file_digest(bundle.onnx_path)[1])
    except BundleError:
        current = False
    if current:
        return kept, False
    removed = path.is_file()
    path.unlink(missing_ok=True)
    return {}, removed


def _export_int8(bundle, result: ExportResult, cal: Calibration | None = None) -> dict[str, Any]:
    """model.int8.onnx, calibrated on `cal` (default: `calibration_data`) and compared with
    model.onnx on images it was not calibrated on where there are any; its record for
    imgrec.json."""
    contract = bundle.preprocess
    cal = cal if cal is not None else calibration_data(bundle)
    path = quantize_int8(result.onnx, bundle.path / ONNX_INT8_FILE,
                         contract.normalize(cal.pixels))
    check = cal.held_out if cal.held_out is not None else cal.pixels
    x = contract.normalize(check)
    got = _onnx_probs(result.onnx, x, bundle.temperature)
    q = _onnx_probs(path, x, bundle.temperature)
    result.int8 = path
    result.int8_max_abs_diff = float(np.abs(q - got).max())
    result.int8_top1_agreement = float((q.argmax(1) == got.argmax(1)).mean())
    result.int8_calibration = cal.source
    result.int8_agreement_images = len(check)
    result.int8_held_out = cal.held_out is not None
    return {"int8": path.name, "int8_source_sha256": file_digest(result.onnx)[1],
            "int8_max_abs_diff": result.int8_max_abs_diff,
            "int8_top1_agreement": result.int8_top1_agreement,
            "int8_agreement_images": len(check), "int8_held_out": cal.held_out is not None,
            "int8_calibration": cal.source}


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


def ensure_int8(model) -> Path:
    """The bundle's model.int8.onnx, quantized from its model.onnx first when it has none or
    an older one (calibrated on the bundle's own training data, as `imgrec export --int8`
    does, but without exporting model.onnx again: no PyTorch needed). Its agreement with
    float32 is recorded in imgrec.json's export table."""
    from .zoo import open_bundle

    bundle = open_bundle(model, need_weights=False)
    path = bundle.path / ONNX_INT8_FILE
    fp32 = Path(bundle.onnx_path)
    if not fp32.is_file():
        raise InputError(f"{bundle.path}: no model.onnx to quantize",
                         f"run `imgrec export {model}` first")
    if bundle.derived_current(ONNX_INT8_FILE):
        return path
    recorded = bundle.extra.get(EXPORT_KEY) or {}
    info = _export_int8(bundle, ExportResult(bundle, fp32, recorded.get("max_abs_diff")))
    bundle.extra[EXPORT_KEY] = {**recorded, **info}
    bundle.write_meta()
    return path


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
