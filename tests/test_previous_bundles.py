"""Bundles written by the previous version (imgrec at 4f0a8f0, before the registry and
training redesign; tests/data/previous-version) load and give the probabilities that
version gave: the state-dict keys, the contract fields and imgrec.json are unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imgrec.bundle import read_bundle
from imgrec.explain import Explainer
from imgrec.predict import Predictor

OLD = Path(__file__).parent / "data" / "previous-version"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_previous_bundle_loads_and_predicts_the_same(name, tmp_path):
    folder = shutil.copytree(OLD / name, tmp_path / name)  # export writes into the bundle
    bundle = read_bundle(folder)
    image = str(OLD / "input.png")
    torch_p = Predictor(bundle, engine="torch", device="cpu")
    probs = torch_p.probabilities(np.stack([torch_p.prepare(image)]))
    assert np.allclose(probs, EXPECTED[name], atol=1e-5)
    exp = Explainer(bundle, device="cpu").gradcam(image)
    assert np.allclose(exp.probs, EXPECTED[name][0], atol=1e-5)

    from imgrec.export import export_bundle

    export_bundle(folder)
    onnx_p = Predictor(read_bundle(folder), engine="onnx")
    assert np.allclose(onnx_p.probabilities(np.stack([onnx_p.prepare(image)])),
                       EXPECTED[name], atol=1e-4)
