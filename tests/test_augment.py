"""Batch augmentation: spec parsing, a real mirror, identity when off, per-image draws."""

from __future__ import annotations

import pytest
import torch

from imgrec.augment import PRESETS, Augment, affine_grid
from imgrec.errors import ImgrecError


def test_parse_presets_and_overrides():
    assert Augment.parse(None) == Augment()
    assert Augment.parse("none") == Augment()
    std = Augment.parse("standard")
    assert std == Augment(rotation=15.0, width_shift=0.1, height_shift=0.1, zoom=0.15, flip=True)
    assert Augment.parse("standard,zoom=0.3").zoom == 0.3
    assert Augment.parse("standard,zoom=0.3").rotation == 15.0
    assert set(PRESETS) >= {"none", "flip", "light", "digits", "standard", "strong"}


def test_parse_key_values():
    a = Augment.parse("rotation=20, shift=0.1, horizontal-flip")
    assert a == Augment(rotation=20.0, width_shift=0.1, height_shift=0.1, flip=True)
    b = Augment.parse("width_shift=0.2,height_shift=0.05,flip=0")
    assert (b.width_shift, b.height_shift, b.flip) == (0.2, 0.05, False)
    assert "flip" in Augment.parse("flip,zoom=0.2").describe()
    assert Augment().describe() == "none" and not Augment().active


@pytest.mark.parametrize("spec", ["bogus=1", "rotate=10", "zoom=abc", "shift=1.5", "zoom=-0.1",
                                  "brightness=2"])
def test_bad_spec(spec):
    with pytest.raises(ImgrecError) as e:
        Augment.parse(spec)
    assert str(e.value)  # one readable line


def test_flip_mirrors():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    torch.manual_seed(0)
    seen_flipped = seen_kept = False
    for _ in range(10):
        out = Augment(flip=True)(x)
        for i in range(2):
            if torch.allclose(out[i], x[i].flip(-1), atol=1e-3):
                seen_flipped = True
            elif torch.allclose(out[i], x[i], atol=1e-3):
                seen_kept = True
            else:
                raise AssertionError("flip produced something that is neither mirror nor copy")
    assert seen_flipped and seen_kept


def test_zero_spec_is_identity():
    x = torch.rand(4, 1, 9, 9) * 255
    assert torch.equal(Augment.parse("none")(x), x)
    assert torch.equal(Augment.parse("rotation=0,shift=0")(x), x)


@pytest.mark.parametrize("h,w", [(28, 28), (9, 16)])
def test_affine_grid_is_torchs(h, w):
    """augment.affine_grid is F.affine_grid (align_corners=False), rounding aside."""
    torch.manual_seed(0)
    theta = torch.randn(5, 2, 3)
    expected = torch.nn.functional.affine_grid(theta, [5, 1, h, w], align_corners=False)
    got = affine_grid(theta, h, w)
    assert got.shape == expected.shape == (5, h, w, 2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_per_sample_randomness():
    torch.manual_seed(1)
    one = torch.zeros(1, 1, 16, 16)
    one[..., 4:12, 6:10] = 255
    x = one.repeat(8, 1, 1, 1)
    out = Augment(rotation=30.0, width_shift=0.2, height_shift=0.2, zoom=0.2)(x)
    assert out.shape == x.shape
    distinct = {tuple(o.round().flatten().tolist()) for o in out}
    assert len(distinct) == 8  # each image got its own transform
    assert float(out.min()) >= -1e-3 and float(out.max()) <= 255 + 1e-3


def test_brightness_range():
    torch.manual_seed(2)
    x = torch.full((64, 1, 2, 2), 100.0)
    out = Augment(brightness=0.2)(x)
    means = out.mean((1, 2, 3))
    assert means.min() >= 80 - 1e-3 and means.max() <= 120 + 1e-3
    assert means.std() > 1  # not one factor for the whole batch


@pytest.mark.parametrize("spec, needle", [
    ("zoom=nan", "not a finite number"), ("rotation=inf", "not a finite number"),
    ("brightness=nan", "not a finite number"), ("rotation=-40", "rotation=-40 is out of range"),
    ("rotation", "rotation needs a value"), ("rotation=200", "out of range"),
])
def test_augment_values_that_would_train_on_garbage_are_refused(spec, needle):
    """NaN or infinite values were accepted and trained on (every augmented image one flat
    colour); a negative one was mangled in the message; a bare key meant 1."""
    with pytest.raises(ImgrecError, match=needle):
        Augment.parse(spec)
    assert Augment.parse("width-shift=0.1,flip").describe() == "flip,width_shift=0.1"
