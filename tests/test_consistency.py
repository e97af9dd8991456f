"""predict, evaluate and explain score an image alike: same decoding, same invert, same
test-time augmentation, same temperature (tiny untrained bundles: seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundles import CLASSES, make_tiny_bundle
from PIL import Image

import imgrec
from imgrec.bundle import read_bundle
from imgrec.explain import Explainer


def _with_contract(path: Path, **changes) -> Path:
    """Rewrite a bundle's contract (and temperature) in its imgrec.json."""
    bundle = read_bundle(path)
    bundle.temperature = changes.pop("temperature", bundle.temperature)
    bundle.preprocess = bundle.preprocess.replace(**changes)
    bundle.write_meta()
    return path


def _digit_png(path: Path, size: int = 40) -> Path:
    """A dark stroke on white paper, off-centre so its mirror differs: a photo of a digit."""
    a = np.full((size, size), 235, np.uint8)
    a[6:34, 8:13] = 20
    a[6:11, 8:24] = 20
    Image.fromarray(a).save(path)
    return path


def _colour_png(path: Path, size: int = 40) -> Path:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    a[:, : size // 3] = (250, 30, 30)  # asymmetric: the mirror is another image
    Image.fromarray(a).save(path)
    return path


def _eval_probs(bundle: Path, image: Path, root: Path) -> np.ndarray:
    """imgrec.evaluate on a folder dataset whose test split holds `image` (as class disc)."""
    for split, cls in (("train", "disc"), ("train", "square"), ("test", "disc"),
                       ("test", "square")):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
    src = Image.open(image)
    for split in ("train", "test"):
        src.save(root / split / "square" / "other.png")
        src.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(root / split / "disc" / "up.png")
    target = root / "test" / "disc" / image.name
    src.save(target)
    rep = imgrec.evaluate(bundle, str(root), "test", engine="torch")
    return rep.probs[rep.inputs.index(str(target))]


def _predict_probs(bundle: Path, image: Path) -> np.ndarray:
    [preds] = imgrec.Predictor.load(bundle, engine="torch").predict([str(image)],
                                                                  top_k=len(CLASSES))
    probs = np.zeros(len(CLASSES), np.float32)
    for p in preds:
        probs[p.index] = p.probability
    return probs


@pytest.fixture
def flip_bundle(tmp_path) -> Path:
    path = make_tiny_bundle(tmp_path / "flip", channels=3, size=32, export=False)
    return _with_contract(path, tta=["flip"], temperature=1.7)


@pytest.fixture
def digit_bundle(tmp_path) -> Path:
    path = make_tiny_bundle(tmp_path / "digit", channels=1, size=28, export=False)
    return _with_contract(path, invert="auto")


def _check(bundle: Path, image: Path, root: Path) -> Explainer:
    """predict's, evaluate's and explain's probabilities for `image` agree to 1e-5."""
    predicted = _predict_probs(bundle, image)
    evaluated = _eval_probs(bundle, image, root)
    explainer = Explainer(bundle)
    explained = explainer.gradcam(image).probs
    np.testing.assert_allclose(evaluated, predicted, atol=1e-5)
    np.testing.assert_allclose(explained, predicted, atol=1e-5)
    np.testing.assert_allclose(explainer.probabilities(image), predicted, atol=1e-5)
    assert predicted.sum() == pytest.approx(1.0, abs=1e-5)
    return explainer


def test_flip_tta_bundle_scores_alike(flip_bundle, tmp_path):
    image = _colour_png(tmp_path / "colour.png")
    explainer = _check(flip_bundle, image, tmp_path / "data")
    # the TTA is real: without it the model scores this image differently
    plain = _with_contract(flip_bundle, tta=[])
    assert np.abs(_predict_probs(plain, image) - explainer.gradcam(image).probs).max() > 1e-4


def test_inverting_digit_bundle_scores_alike(digit_bundle, tmp_path):
    image = _digit_png(tmp_path / "digit.png")
    explainer = _check(digit_bundle, image, tmp_path / "data")
    pixels = explainer.prepare(image)
    assert pixels.shape == (1, 28, 28) and pixels[0, 0, 0] < 40  # inverted: ink is light
    # an explicit invert goes through explain as through predict
    kept = explainer.gradcam(image, invert="no").probs
    [preds] = imgrec.Predictor.load(digit_bundle, engine="torch").predict(
        [str(image)], top_k=len(CLASSES), invert="no")
    np.testing.assert_allclose([kept[p.index] for p in preds], [p.probability for p in preds],
                               atol=1e-5)
    assert np.abs(kept - explainer.gradcam(image).probs).max() > 1e-4
