"""Every network imgrec can train can be served: for each registry model (and a timm model, and
each transfer mode and head) a training of a few seconds -> bundle -> ONNX export -> a real
`imgrec serve` subprocess without torch -> HTTP predict of a real image, which must give the
same top-1 and probabilities (1e-4) as `imgrec predict`, `imgrec evaluate` and the PyTorch
network itself on that image."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CATS_DOGS, make_shapes_dataset
from helpers import write_fake_mnist, write_pixel_csv
from PIL import Image
from servers import serve_without_torch

from imgrec.cli import main as cli

TOL = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    data: str  # a key of the `datasets` fixture
    options: dict[str, Any] = field(default_factory=dict)
    shared: bool = False  # needs ../shared/data/cats-dogs-mini


FAST = {"epochs": 1, "augment": "none", "batch_size": 16}
PHOTOS = {**FAST, "batch_size": 8}
CASES = [
    Case("fast-cnn (mnist recipe)", "mnist", {"epochs": 1}),
    Case("fast-cnn (fashion recipe, flip TTA)", "fashion-mnist", {"epochs": 1}),
    Case("mlp", "mnist", {**FAST, "model": "mlp"}),
    Case("cnn", "mnist", {**FAST, "model": "cnn"}),
    Case("fast-cnn (pixel CSV)", "pixel-csv", FAST),
    Case("cifar-cnn", "colour32", {**FAST, "model": "cifar-cnn"}),
    Case("res-cnn", "colour32", {**FAST, "model": "res-cnn", "model_args": {"width": 16}}),
    Case("airnet (whitened first layer, lookahead)", "colour32",
         {**FAST, "model": "airnet", "model_args": {"widths": [8, 16, 16]},
          "lookahead": True, "augment": "flip,crop=2"}),
    Case("fast-cnn 32 px colour", "colour32", {**FAST, "model": "fast-cnn",
                                               "model_args": {"grid": 3}}),
    Case("resnet18 (timm)", "colour32", {**FAST, "model": "resnet18"}),
    Case("small-cnn (train/validation/test folders)", "cats-dogs",
         {**PHOTOS, "model": "small-cnn", "image_size": 96}, shared=True),
    Case("lite0 features, linear head", "cats-dogs",
         {**PHOTOS, "model": "efficientnet_lite0", "mode": "features"}, shared=True),
    Case("lite0 features, MLP head", "cats-dogs",
         {**PHOTOS, "model": "efficientnet_lite0", "mode": "features", "head": "mlp"},
         shared=True),
    Case("lite0 finetune", "cats-dogs-tiny",
         {**PHOTOS, "model": "efficientnet_lite0", "mode": "finetune"}, shared=True),
    Case("lite1 features", "cats-dogs-tiny",
         {**PHOTOS, "model": "efficientnet_lite1", "mode": "features"}, shared=True),
    Case("lite2 features", "cats-dogs-tiny",
         {**PHOTOS, "model": "efficientnet_lite2", "mode": "features"}, shared=True),
]


def _cats_dogs_subset(dest: Path, per_class: int, held: int) -> Path:
    """A flow_from_directory layout (train/validation/test) cut from cats-dogs-mini."""
    for cls in ("cat", "dog"):
        train = sorted((CATS_DOGS / "train" / cls).glob("*.jpg"))[:per_class]
        rest = sorted((CATS_DOGS / "validation" / cls).glob("*.jpg"))[: 2 * held]
        for split, files in (("train", train), ("validation", rest[:held]),
                             ("test", rest[held:])):
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each dataset as train() takes it, with one real test image file and its label."""
    base = tmp_path_factory.mktemp("matrix-data")
    builtins = base / "builtins"
    write_fake_mnist(builtins, n_train=300, n_test=30)
    fashion = write_fake_mnist(base / "fashion-src", n_train=300, n_test=30)
    shutil.copytree(fashion, builtins / "fashion-mnist")
    out: dict[str, dict[str, Any]] = {}
    digit = base / "digit-7.png"  # a test-set digit, as a user would save one
    from imgrec.data.builtins import read_idx

    images = read_idx(builtins / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(builtins / "mnist" / "t10k-labels-idx1-ubyte.gz")
    i = int(np.flatnonzero(labels == 7)[0])
    Image.fromarray(images[i]).save(digit)
    for name in ("mnist", "fashion-mnist"):
        out[name] = {"data": name, "data_dir": str(builtins), "image": digit,
                     "label": str(7) if name == "mnist" else None}
    csv = write_pixel_csv(base / "sign.csv", [i % 5 for i in range(150)])
    out["pixel-csv"] = {"data": str(csv), "image": digit, "label": None}
    shapes = make_shapes_dataset(base / "shapes", per_class=24, layout="split")
    out["colour32"] = {"data": str(shapes), "image_size": 32,
                       "image": sorted((shapes / "test" / "disc").glob("*.png"))[0],
                       "label": "disc"}
    if (CATS_DOGS / "train").is_dir():
        for key, per_class, held in (("cats-dogs", 24, 4), ("cats-dogs-tiny", 8, 2)):
            root = _cats_dogs_subset(base / key, per_class, held)
            out[key] = {"data": str(root), "label": "cat",
                        "image": sorted((root / "test" / "cat").glob("*.jpg"))[0]}
    return out


def _cli_json(capsys, *args: str) -> Any:
    capsys.readouterr()
    assert cli(list(args)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_train_export_serve_predict_agree(case: Case, datasets, tmp_path, capsys):
    from imgrec import evaluate, train
    from imgrec.export import export_bundle
    from imgrec.predict import Predictor

    if case.data not in datasets:
        pytest.skip("../shared/data/cats-dogs-mini is absent")
    d = datasets[case.data]
    options = {"workers": 0, "quiet": True, "tensorboard": False, "out": str(tmp_path / "b"),
               **case.options}
    for key in ("data_dir", "image_size"):
        if key in d and key not in options:
            options[key] = d[key]
    bundle = train(d["data"], **options).bundle
    classes = bundle.classes

    # export: ONNX checked against PyTorch on real photos
    exported = export_bundle(str(bundle.path))
    assert exported.max_abs_diff <= TOL

    image = str(d["image"])
    everything = str(len(classes))
    predicted = _cli_json(capsys, "predict", image, "--model", str(bundle.path), "--json",
                          "--top-k", everything)[0]["predictions"]
    cli_probs = np.zeros(len(classes))
    for p in predicted:
        cli_probs[p["index"]] = p["probability"]

    # evaluate the same image, as the one test item of a path,label,split CSV
    label = d["label"] or classes[int(cli_probs.argmax())]
    csv = tmp_path / "one.csv"
    csv.write_text(f"path,label,split\n{image},{label},test\n")
    report = evaluate(str(bundle.path), str(csv), split="test")
    assert report.n == 1
    eval_probs = report.probs[0]

    torch_probs = Predictor.load(str(bundle.path), engine="torch").predict(
        [image], top_k=len(classes))[0]
    pt = np.zeros(len(classes))
    for p in torch_probs:
        pt[p.index] = p.probability

    with serve_without_torch(str(bundle.path)) as server:
        r = httpx.post(f"{server.base}/v1/predict?top_k={everything}",
                       files={"file": (Path(image).name, Path(image).read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()["predictions"]
        info = httpx.get(f"{server.base}/v1/model", timeout=10).json()
    assert info["engine"] == "onnxruntime"
    served_probs = np.zeros(len(classes))
    for p in served:
        served_probs[p["index"]] = p["probability"]
    assert served[0]["label"] == predicted[0]["label"] == classes[int(eval_probs.argmax())]
    np.testing.assert_allclose(served_probs, cli_probs, atol=TOL)
    np.testing.assert_allclose(served_probs, eval_probs, atol=TOL)
    np.testing.assert_allclose(served_probs, pt, atol=TOL)
