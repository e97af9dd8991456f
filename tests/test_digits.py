"""The digit and object fits of the preprocessing contract (issue 9): custom images, such as a
canvas drawing or a photo of a digit written on paper, are framed as MNIST framed its digits
(or as Fashion-MNIST framed its products) before the model sees them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgrec.bundle import read_bundle
from imgrec.contract import Preprocess, fit_arrays, load_input
from imgrec.errors import BundleError

DIGIT = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto",
                   fit="digit")


def _seven(size: int = 280, stroke: int = 14, box=(150, 40, 240, 200), dark=True,
           background=None) -> Image.Image:
    """A '7' drawn on a canvas: dark on light (or light on dark) over an optional background."""
    x0, y0, x1, y1 = box
    ink = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ink)
    draw.line([(x0, y0), (x1, y0), (x0 + (x1 - x0) // 3, y1)], fill=255, width=stroke,
              joint="curve")
    alpha = np.asarray(ink, np.float32) / 255
    paper = np.full((size, size), 255.0) if background is None else background
    ink_level = 30.0 if dark else 255.0
    if not dark and background is None:
        paper = np.zeros((size, size))
    return Image.fromarray(np.clip(paper * (1 - alpha) + ink_level * alpha, 0, 255)
                           .astype(np.uint8), "L")


def _mass_centre(a: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    ys, xs = np.indices(a.shape)
    return float((a * ys).sum() / a.sum()), float((a * xs).sum() / a.sum())


def _box(a: np.ndarray, level: int = 0) -> tuple[int, int]:
    rows, cols = np.flatnonzero((a > level).any(1)), np.flatnonzero((a > level).any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_dark_digit_on_a_lighting_gradient_is_framed_like_mnist():
    # grey paper lit from the left (from 235 down to 110): darker than the ink's contrast
    gradient = np.linspace(235, 110, 280)[None, :].repeat(280, 0)
    photo = _seven(background=gradient)
    out = DIGIT.to_uint8(photo)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    a = out[0]
    # light ink on a black background: the paper and its gradient are gone
    assert a.max() == 255 and np.count_nonzero(a) < 0.35 * a.size
    assert a[0].max() == 0 and a[-1].max() == 0 and a[:, 0].max() == 0 and a[:, -1].max() == 0
    # the digit's box fits 20 x 20 with its long side 20 (+1 for the anti-aliased edge)
    h, w = _box(a)
    assert 20 <= max(h, w) <= 21 and min(h, w) < 20
    # centred by its centre of mass, not by its box (MNIST: at pixel 14, 14)
    cy, cx = _mass_centre(a)
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6


def test_polarity_size_and_place_do_not_matter():
    """The same digit dark on white, light on black, small in a corner or large in the
    middle gives (nearly) the same 28 x 28 image."""
    ref = DIGIT.to_uint8(_seven())[0].astype(int)
    for variant in (_seven(dark=False), _seven(box=(10, 150, 60, 250), stroke=6),
                    _seven(box=(40, 20, 230, 260), stroke=26)):
        out = DIGIT.to_uint8(variant)[0].astype(int)
        assert np.abs(out - ref).mean() < 25, np.abs(out - ref).mean()
    # the explicit setting still wins: "no" takes the white page for light ink on black
    assert not np.array_equal(DIGIT.to_uint8(_seven(), invert="no"), DIGIT.to_uint8(_seven()))


def test_specks_and_noise_do_not_move_the_box():
    clean = DIGIT.to_uint8(_seven())[0]
    img = np.asarray(_seven(), np.float32).copy()
    rng = np.random.default_rng(0)
    img += rng.normal(0, 8, img.shape)
    img[5:8, 5:8] = 0  # a speck of dirt far from the digit
    img[270:273, 20:22] = 0
    noisy = DIGIT.to_uint8(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))[0]
    assert _box(noisy, 40) == _box(clean, 40)
    assert np.abs(noisy.astype(int) - clean).mean() < 12


def test_blank_and_odd_images_do_not_fail():
    for img in (Image.new("L", (280, 280), 255), Image.new("L", (1, 1), 0),
                Image.new("RGB", (3000, 2), (10, 200, 30)), Image.new("L", (1, 500), 128),
                Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8))):
        out = DIGIT.to_uint8(img)
        assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert not DIGIT.to_uint8(Image.new("L", (280, 280), 255)).any()  # nothing drawn


def test_mnist_digits_come_back_as_they_were():
    """An MNIST-style image (already framed) read from a PNG is unchanged: an image at the
    frame size is a dataset image, as the arrays evaluate scores are (it was framed again,
    and MNIST's test digits as PNG scored 0.9944 where evaluate said 0.9949). Larger
    images, and Fashion's object fit, still get framed."""
    a = np.asarray(DIGIT.to_uint8(_seven(dark=False))[0])
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    again = load_input(buf.getvalue(), DIGIT)
    assert np.array_equal(again, fit_arrays(a[None, None], DIGIT)[0])
    cropping = DIGIT.replace(input_size=24, resize="shorter", resize_to=28)  # MNIST's recipe
    assert np.array_equal(load_input(buf.getvalue(), cropping),
                          fit_arrays(a[None, None], cropping)[0])
    off_centre = np.zeros((28, 28), np.uint8)
    off_centre[2:10, 2:6] = 255
    buf = io.BytesIO()
    Image.fromarray(off_centre).resize((56, 56)).save(buf, "PNG")  # not the frame size
    framed = load_input(buf.getvalue(), DIGIT)[0]
    assert abs(_mass_centre(framed)[0] - 14) < 1.5 and abs(_mass_centre(framed)[1] - 14) < 1.5


def test_object_fit_fills_the_frame():
    """Fashion-MNIST style: a dark product on a white photo becomes light on black, its
    longest edge fills the frame, centred by its box; grey levels are kept."""
    img = Image.new("L", (400, 300), 250)
    draw = ImageDraw.Draw(img)
    draw.rectangle((250, 60, 330, 260), fill=40)  # a tall 'garment', off centre
    draw.rectangle((270, 100, 310, 140), fill=140)  # a lighter patch on it
    c = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,), invert="auto",
                   fit="object")
    a = c.to_uint8(img)[0]
    h, w = _box(a, 10)
    assert h == 28 and 10 <= w <= 13  # 200 x 80 -> 28 x 11
    cols = np.flatnonzero((a > 10).any(0))
    assert abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1  # centred
    assert a[0, 0] == 0 and a[14, 14] > 180 and 60 < a[8, 14] < 160  # the patch stays grey


def test_colour_contract_gets_the_grey_fit_on_each_channel():
    c = DIGIT.replace(channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    out = c.to_uint8(_seven().convert("RGB"))
    assert out.shape == (3, 28, 28)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], DIGIT.to_uint8(_seven())[0])


def test_fit_is_recorded_and_old_bundles_load_as_none(tmp_path):
    d = DIGIT.to_dict()
    assert d["fit"] == "digit" and Preprocess.from_dict(json.loads(json.dumps(d))) == DIGIT
    old = {k: v for k, v in d.items() if k != "fit"}
    assert Preprocess.from_dict(old).fit == "none"
    with pytest.raises(BundleError):
        Preprocess.from_dict({**d, "fit": "stretch"})
    # a bundle written before the field existed: imgrec.json without it
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx").write_bytes(b"")
    (tmp_path / "b" / "imgrec.json").write_text(json.dumps({
        "format": "imgrec-bundle", "format_version": 1, "classes": ["a", "b"],
        "architecture": {"name": "fast-cnn", "args": {}}, "preprocess": old}))
    bundle = read_bundle(tmp_path / "b", need_weights=False)
    assert bundle.preprocess.fit == "none"
    # ... and preprocesses exactly as before: a plain resize
    img = _seven()
    assert np.array_equal(bundle.preprocess.to_uint8(img),
                          Preprocess.from_dict({**old, "fit": "none"}).to_uint8(img))


def test_training_arrays_never_go_through_the_fit():
    """In-memory MNIST is already framed: fit_arrays leaves it to the plain contract."""
    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (4, 1, 28, 28), np.uint8)
    assert fit_arrays(same, DIGIT) is same
    bigger = fit_arrays(same, DIGIT.replace(input_size=32))
    plain = fit_arrays(same, DIGIT.replace(input_size=32, fit="none"))
    assert np.array_equal(bigger, plain)


def test_jpeg_photos_decode_big_enough_for_the_fit(tmp_path):
    assert DIGIT.draft_size[0] >= 512 and DIGIT.replace(fit="none").draft_size == (28, 28)
    big = _seven(size=280).resize((2800, 2800))
    path = tmp_path / "photo.jpg"
    big.save(path, quality=90)
    out = load_input(path, DIGIT)[0]
    assert np.abs(out.astype(int) - DIGIT.to_uint8(_seven())[0]).mean() < 12


def test_recipes_record_the_fit(tmp_path):
    from helpers import write_fake_mnist

    from imgrec.training.api import plan

    write_fake_mnist(tmp_path)
    (tmp_path / "fashion-mnist").symlink_to(tmp_path / "mnist")
    for data, fit in (("mnist", "digit"), ("fashion-mnist", "object")):
        t = plan(data, data_dir=str(tmp_path), quiet=True, out=str(tmp_path / f"{data}-out"))
        assert (t.contract.fit, t.contract.invert) == (fit, "auto")
        # an explicit --invert still wins over the recipe
        t = plan(data, data_dir=str(tmp_path), quiet=True, invert="no",
                 out=str(tmp_path / f"{data}-out"))
        assert t.contract.invert == "no"


def test_a_cropping_contract_frames_at_28_then_takes_the_centre():
    """With MNIST's crop (input 24 of 28) a drawing is framed in 28 x 28 as MNIST framed its
    digits, then cropped as the training images were: the same pixels as the 28 px fit's
    centre, never a digit squeezed into 24 px."""
    crop = DIGIT.replace(input_size=24, resize="shorter", resize_to=28)
    assert crop.frame_size == 28 and DIGIT.frame_size == 28
    framed, cropped = DIGIT.to_uint8(_seven()), crop.to_uint8(_seven())
    assert cropped.shape == (1, 24, 24)
    assert np.array_equal(cropped, framed[:, 2:26, 2:26])
    # the 20 px box, centred by its mass (as MNIST's are), keeps nearly all its ink
    assert cropped.sum() > 0.95 * framed.sum()


def test_the_mnist_recipe_crops_unless_an_image_size_is_given(tmp_path):
    from helpers import write_fake_mnist

    from imgrec.training.api import plan

    write_fake_mnist(tmp_path)
    t = plan("mnist", data_dir=str(tmp_path), quiet=True, out=str(tmp_path / "a"))
    c = t.contract
    assert (t.image_size, c.input_size, c.resize, c.resize_to) == (24, 24, "shorter", 28)
    t = plan("mnist", data_dir=str(tmp_path), quiet=True, out=str(tmp_path / "b"),
             image_size=28)
    assert (t.image_size, t.contract.input_size, t.contract.resize) == (28, 28, "squash")


def test_another_network_keeps_the_datasets_data_settings_not_its_networks_training(tmp_path):
    """The recipes' optimisation is their network's: the workshops' mlp got fast-cnn's adamw
    lr 0.04 and unlearned (91.4% after 1 epoch, 90.2% after 2), and cifar-cnn got airnet's
    SGD lr 0.5 at batch 512 with lookahead and stayed at chance. Another network keeps how
    the data is read and augmented and trains with OTHER_NETWORK's settings."""
    from helpers import write_fake_mnist

    from imgrec.training.api import plan
    from imgrec.training.recipes import OTHER_NETWORK, RECIPES

    write_fake_mnist(tmp_path)
    own = plan("mnist", data_dir=str(tmp_path), quiet=True, out=str(tmp_path / "a"))
    same = plan("mnist", model="fast-cnn", data_dir=str(tmp_path), quiet=True,
                out=str(tmp_path / "b"))
    for p in (own, same):
        assert (p.lr, p.batch_size, p.recipe) == (RECIPES["mnist"]["lr"], 256, "short")
    mlp = plan("mnist", model="mlp", data_dir=str(tmp_path), quiet=True, out=str(tmp_path / "c"))
    assert (mlp.lr, mlp.batch_size, mlp.optimizer, mlp.epochs, mlp.recipe) == (
        OTHER_NETWORK["lr"], OTHER_NETWORK["batch_size"], "adamw", 10, "network")
    assert mlp.contract.input_size == 28 and not mlp.lookahead  # no fast-cnn crop
    assert mlp.contract.fit == "digit" and mlp.augment.describe() == own.augment.describe()
    assert mlp.has_validation  # early stopping has something to watch
    mine = plan("mnist", model="mlp", lr=0.01, epochs=3, data_dir=str(tmp_path), quiet=True,
                out=str(tmp_path / "d"))
    assert (mine.lr, mine.epochs) == (0.01, 3)  # the user's options still win
