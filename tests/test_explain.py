"""Grad-CAM is correct, not decorative (the offline ImageNet model on scikit-image photos),
and explain works on every scratch CNN of the registry through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import main


def assert_labelled(monkeypatch) -> list:
    """Make every saved matplotlib figure prove each visible axis has x/y labels and a title."""
    from matplotlib.figure import Figure

    seen: list = []
    original = Figure.savefig

    def checked(fig, *args, **kwargs):
        for ax in fig.axes:
            if not ax.axison or ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axis in {args[0]}"
            assert ax.get_title() or fig._suptitle is not None, f"untitled axis in {args[0]}"
        seen.append(Path(getattr(args[0], "name", args[0])))  # save_figure: bytes, then rename
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    return seen


@pytest.fixture(scope="module")
def imagenet():
    from imgrec.explain import Explainer

    return Explainer("imagenet")


def _mass(heat: np.ndarray, rows: slice, cols: slice) -> float:
    return float(heat[rows, cols].sum() / heat.sum())


def test_gradcam_finds_the_cat(imagenet, sample_photo, tmp_path):
    cat = imagenet.gradcam(sample_photo("chelsea"), "tabby cat")
    assert cat.class_name == "tabby, tabby cat" and cat.layer == "forward_features"
    assert cat.heatmap.shape == (224, 224) and cat.heatmap.max() == pytest.approx(1.0)
    top = [name for name, _ in cat.top(3)]
    assert {"tiger cat", "tabby, tabby cat", "Egyptian cat"} >= set(top)
    # The crop the model sees is the cat's face; its heat lies on the face (eyes to chin:
    # x 30..215, y 40..224), not in the fur border at the top.
    assert _mass(cat.heatmap, slice(40, 224), slice(30, 215)) > 0.8
    # An unrelated class explains the same image differently.
    for other in ("espresso", "space shuttle"):
        exp = imagenet.gradcam(sample_photo("chelsea"), other)
        r = np.corrcoef(cat.heatmap.ravel(), exp.heatmap.ravel())[0, 1]
        assert r < 0.7, (other, r)
        assert exp.probs[exp.class_index] < 0.01

    # A composite: the cat top-left, an espresso bottom-right. Each class's heat goes to its
    # own object: a localisation test with ground truth.
    def square(a: np.ndarray) -> np.ndarray:
        h, w = a.shape[:2]
        s = min(h, w)
        crop = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        return np.asarray(Image.fromarray(crop).resize((256, 256)))

    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[:256, :256] = square(np.asarray(Image.open(sample_photo("chelsea"))))
    canvas[256:, 256:] = square(np.asarray(Image.open(sample_photo("coffee"))))
    path = tmp_path / "cat_and_coffee.jpg"
    Image.fromarray(canvas).save(path, quality=92)
    cat = imagenet.gradcam(path, "tabby cat")
    cup = imagenet.gradcam(path, "espresso")
    tl, br = (slice(0, 112), slice(0, 112)), (slice(112, 224), slice(112, 224))
    assert _mass(cat.heatmap, *tl) > 2 * _mass(cat.heatmap, *br)
    assert _mass(cup.heatmap, *br) > 0.6 and _mass(cup.heatmap, *tl) < 0.15
    peak = np.unravel_index(cat.heatmap.argmax(), cat.heatmap.shape)
    assert peak[0] < 130 and peak[1] < 130  # in (or at the edge of) the cat's quadrant
    peak = np.unravel_index(cup.heatmap.argmax(), cup.heatmap.shape)
    assert peak[0] >= 112 and peak[1] >= 112


def test_gradcam_heat_sits_where_the_object_is(imagenet, sample_photo):
    """The cat's face pasted at 9 places of a grey 224 x 224 input: the heat's centroid
    follows it. The 7 x 7 map was drawn half a cell (16 px) down and right of where timm's
    stride-2 convolutions centre each cell: the heat sat 22-27 px (up to 32) off the face,
    now 13-15 px on average (the network's own lean, the same mirrored), at most 20."""
    cat = Image.open(sample_photo("chelsea")).convert("RGB")
    w, h = cat.size
    face = np.asarray(cat.crop(((w - h) // 2, 0, (w - h) // 2 + h, h)).resize((96, 96)))
    ys, xs = np.mgrid[:224, :224]
    offsets = []
    for oy in (32, 64, 96):
        for ox in (32, 64, 96):
            canvas = np.full((224, 224, 3), 128, np.uint8)
            canvas[oy : oy + 96, ox : ox + 96] = face
            heat = imagenet.gradcam(canvas.transpose(2, 0, 1).copy(), "tabby cat").heatmap
            offsets.append(((heat * xs).sum() / heat.sum() - (ox + 47.5),
                            (heat * ys).sum() / heat.sum() - (oy + 47.5)))
    offsets = np.asarray(offsets)
    assert (np.abs(offsets.mean(0)) < 18).all() and (np.abs(offsets).max(0) < 24).all(), \
        offsets.round(1)


def test_feature_maps_and_filters_of_imagenet(imagenet, sample_photo, tmp_path, monkeypatch):
    from imgrec.explain import plot_feature_maps, plot_filters

    seen = assert_labelled(monkeypatch)
    pixels, maps = imagenet.feature_maps(sample_photo("chelsea"))
    names = [n for n, _ in maps]
    assert names[0] == "conv_stem" and names[-1] == "conv_head" and len(maps) == 9
    assert maps[0][1].shape == (32, 112, 112) and maps[-1][1].shape == (1280, 7, 7)
    name, w = imagenet.first_filters()
    assert name == "conv_stem" and w.shape == (32, 3, 3, 3)
    plot_feature_maps(maps[:3], pixels, tmp_path / "maps.png")  # the full grid: CLI test
    plot_filters(name, w, tmp_path / "filters.png")
    assert len(seen) == 2 and all(Path(p).stat().st_size > 10_000 for p in seen)


@pytest.fixture
def scratch_bundle(tmp_path):
    """A scratch bundle per architecture, built with save_bundle (no training needed)."""
    from imgrec.bundle import Bundle
    from imgrec.contract import Preprocess
    from imgrec.models.registry import build_model
    from imgrec.network import save_bundle

    def make(name: str, size: int = 32, channels: int = 3) -> Path:
        args = {"in_channels": channels, "num_classes": 2, "image_size": size}
        model = build_model(name, **args)
        contract = Preprocess(input_size=size, channels=channels, mean=(0.5,) * channels,
                              std=(0.5,) * channels)
        path = tmp_path / name
        save_bundle(Bundle(path, {"name": name, "args": args}, ["disc", "square"], contract),
                    model)
        return path

    return make


@pytest.mark.parametrize("arch", ["cnn", "cifar-cnn", "small-cnn", "fast-cnn", "res-cnn"])
def test_every_scratch_cnn_is_explained(arch, scratch_bundle, shapes, monkeypatch):
    from imgrec.explain import Explainer

    size = 48 if arch == "small-cnn" else 32
    bundle = scratch_bundle(arch, size)
    image = next((shapes / "disc").glob("*.png"))
    ex = Explainer(bundle)
    exp = ex.gradcam(image, "square")
    assert exp.class_name == "square" and exp.heatmap.shape == (size, size)
    assert np.isfinite(exp.heatmap).all() and exp.raw.ndim == 2 and exp.raw.size > 1
    _, maps = ex.feature_maps(image)
    assert len(maps) >= 3 and all(m.ndim == 3 for _, m in maps)


def test_explain_cli(scratch_bundle, shapes, tmp_path, capsys, monkeypatch):
    seen = assert_labelled(monkeypatch)
    bundle = scratch_bundle("fast-cnn")
    image = next((shapes / "square").glob("*.png"))
    out = tmp_path / "cam.png"
    assert main(["explain", str(bundle), str(image), "--out", str(out), "--top-k", "2",
                 "--feature-maps", "--filters"]) == 0
    text = capsys.readouterr().out
    assert "Grad-CAM for" in text and "disc" in text and "square" in text
    for p in (out, tmp_path / "cam-feature-maps.png", tmp_path / "cam-filters.png"):
        assert Image.open(p).size[0] > 300
    assert len(seen) == 3
    # one-line errors
    assert main(["explain", str(bundle), str(image), "--class", "triangle"]) == 2
    assert "no class 'triangle'" in capsys.readouterr().err
    assert main(["explain", str(scratch_bundle("mlp")), str(image)]) == 2
    assert "no convolutional layer" in capsys.readouterr().err
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert main(["explain", str(bundle), str(bad)]) == 2


#: what `imgrec explain --feature-maps` shows for each scratch net (recorded before Grad-CAM
#: moved onto forward_features): stage names and map shapes, 2 classes; and the side of the
#: map Grad-CAM weighs (unchanged too)
CAM_SIDE = {"cnn": 3, "cifar-cnn": 6, "small-cnn": 4, "fast-cnn": 7, "res-cnn": 4}
STAGES = {
    ("cnn", 28, 1): [("features.1", (32, 26, 26)), ("features.4", (64, 11, 11)),
                     ("features.7", (64, 3, 3))],
    ("cifar-cnn", 32, 3): [("features.1", (32, 32, 32)), ("features.3", (32, 30, 30)),
                           ("features.7", (64, 15, 15)), ("features.9", (64, 13, 13))],
    ("small-cnn", 48, 3): [("features.1", (32, 46, 46)), ("features.4", (64, 21, 21)),
                           ("features.7", (128, 8, 8))],
    ("fast-cnn", 28, 1): [("features.0", (16, 28, 28)), ("features.4", (32, 14, 14)),
                          ("features.8", (64, 7, 7))],
    ("res-cnn", 32, 3): [("features.0", (64, 32, 32)), ("features.1", (128, 32, 32)),
                         ("features.3", (128, 16, 16)), ("features.4", (256, 16, 16)),
                         ("features.6", (512, 8, 8)), ("features.8", (512, 4, 4))],
}


@pytest.mark.parametrize("case", list(STAGES), ids=lambda c: c[0])
def test_feature_map_stages_are_unchanged(case, scratch_bundle):
    from imgrec.explain import Explainer

    arch, size, channels = case
    ex = Explainer(scratch_bundle(arch, size, channels))
    pixels = np.random.default_rng(0).integers(0, 256, (channels, size, size), dtype=np.uint8)
    _, maps = ex.feature_maps(pixels)
    assert [(n, m.shape) for n, m in maps] == STAGES[case]
    exp = ex.gradcam(pixels)  # on forward_features: the last stage's map
    assert exp.layer == "forward_features" and exp.raw.shape == (CAM_SIDE[arch],) * 2


def test_gradcam_with_flip_tta_is_mirror_symmetric(scratch_bundle, tmp_path):
    """With flip TTA the score is the mean over the image and its mirror, and the CAM the
    mean of the image's and the (mirrored back) mirror's: explaining the mirrored image gives
    the same probabilities and the mirrored heatmap."""
    import torch

    from imgrec.bundle import read_bundle
    from imgrec.explain import Explainer

    torch.manual_seed(0)
    path = scratch_bundle("fast-cnn", 32, 3)
    bundle = read_bundle(path)
    bundle.preprocess = bundle.preprocess.replace(tta=["flip"])
    bundle.write_meta()
    ex = Explainer(path)
    pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    pixels[:, :, :9] = 255
    a = ex.gradcam(pixels, "square")
    b = ex.gradcam(np.ascontiguousarray(pixels[:, :, ::-1]), "square")
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    assert a.raw.max() > 0  # an untrained net: tiny values, compared relative to the peak
    np.testing.assert_allclose(a.raw, b.raw[:, ::-1], atol=1e-4 * a.raw.max())
    np.testing.assert_allclose(a.heatmap, b.heatmap[:, ::-1], atol=1e-4)
    assert not np.allclose(a.heatmap, a.heatmap[:, ::-1], atol=0.05)  # the image is not


def test_transfer_net_is_explained(tmp_path):
    """The 'transfer' architecture (backbone + MLP head) has timm's interface too."""
    from imgrec.bundle import Bundle
    from imgrec.contract import Preprocess
    from imgrec.explain import Explainer
    from imgrec.models import build_model
    from imgrec.network import save_bundle

    args = {"backbone": "efficientnet_lite0", "num_classes": 2, "image_size": 64}
    contract = Preprocess(input_size=64, channels=3)
    path = save_bundle(Bundle(tmp_path / "t", {"name": "transfer", "args": args},
                              ["disc", "square"], contract), build_model("transfer", **args)).path
    ex = Explainer(path)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    exp = ex.gradcam(pixels)
    assert exp.raw.shape == (2, 2) and exp.heatmap.shape == (64, 64)
    _, maps = ex.feature_maps(pixels)
    names = [n for n, _ in maps]
    assert names[0] == "backbone.conv_stem" and names[-1] == "backbone.conv_head"


def test_space_to_depth_kernels_are_shown_over_the_image_pixels():
    """fast-cnn's MNIST stem (PixelUnshuffle 2, then a 3x3 conv) is a 6x6 convolution of
    stride 2 on the image: --filters shows those 6x6 kernels, which reproduce the stem."""
    import torch
    import torch.nn.functional as F

    from imgrec.explain import Explainer
    from imgrec.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=28, grid=3,
                      stem="space-to-depth", stem_width=32).eval()
    explainer = Explainer.__new__(Explainer)
    explainer.model = net
    name, w = explainer.first_filters()
    assert w.shape == (32, 1, 6, 6) and name.startswith("features.1, 3x3 on 2x2-folded")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        stem = net.features[1](net.features[0](x))
        direct = F.conv2d(F.pad(x, (2, 2, 2, 2)), torch.from_numpy(w), stride=2)
    assert torch.allclose(stem, direct, atol=1e-5)


def test_a_class_named_by_digits_is_chosen_by_its_name_before_an_index():
    """Class folders 1/ and 2/: `--class 1` explained class '2' (index 1) and `--class 2` was
    out of range; an exact name now wins, and an index still works where no name matches."""
    from imgrec.errors import InputError
    from imgrec.explain import Explainer

    ex = Explainer.__new__(Explainer)  # class_index needs only the class names
    ex.classes = ["1", "2"]
    probs = np.array([0.3, 0.7])
    assert ex.class_index("1", probs) == 0 and ex.class_index("2", probs) == 1
    assert ex.class_index(1, probs) == 1  # an int from the Python API is an index
    with pytest.raises(InputError, match="out of range"):
        ex.class_index("3", probs)
    ex.classes = ["cat", "dog"]
    assert ex.class_index("1", probs) == 1 and ex.class_index(None, probs) == 1
