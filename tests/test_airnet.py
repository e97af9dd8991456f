"""The CPU CIFAR-10 recipe's parts: airnet's whitening init, the exact uint8 batch
augmentation, the precision choice, lookahead weights in the bundle, export parity, and
--recipe long."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imgrec
from imgrec.augment import Augment, shift_and_flip
from imgrec.errors import ImgrecError
from imgrec.models import build_model
from imgrec.training import engine
from imgrec.training.engine import Lookahead, autocast_dtype

WIDTHS = [8, 16, 16]


def _smooth_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (as photos are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 34, 34, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1)  # spatial correlation
    return torch.cat([x, 0.8 * x + 0.2 * torch.randn(x.shape, generator=g), -x], 1)


def test_whitening_init_whitens_patches():
    net = build_model("airnet", in_channels=3, num_classes=10, image_size=32, widths=WIDTHS)
    x = _smooth_images()
    net.init_from_data(x)
    w = net.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    assert torch.equal(w[:12], -w[12:])  # both signs, for the GELU after it
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    out = (patches - patches.mean(0)) @ w[:12].reshape(12, 12).T
    cov = out.T @ out / len(out)
    # whitened: unit variance and uncorrelated wherever the data has real variance
    strong = torch.diag(cov) > 0.5
    assert strong.sum() >= 6
    sub = cov[strong][:, strong]
    assert torch.allclose(sub, torch.eye(len(sub)), atol=0.05)


def test_augment_keeps_uint8_shape_and_is_seeded():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = Augment.parse("flip,crop=2")
    assert aug.exact and aug.crop == 2 and aug.describe() == "flip,crop=2"
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    torch.manual_seed(4)
    c = aug(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every image is its original moved by whole pixels (and maybe mirrored): the centre
    # 28x28 is found in the original, flipped or not
    for i in range(16):
        found = False
        for src in (x[i], x[i].flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if torch.equal(a[i, :, 2:30, 2:30], src[:, 2 + dy:30 + dy, 2 + dx:30 + dx]):
                        found = True
        assert found, f"image {i} is not a whole-pixel shift of its original"


def test_crop_reflects_borders_and_zero_is_identity():
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    assert torch.equal(shift_and_flip(x, 0, False), x)
    torch.manual_seed(0)
    out = shift_and_flip(x.repeat(50, 1, 1, 1), 1, False)
    assert set(out.flatten().tolist()) <= set(range(25))  # reflected, never padded with 0s
    with pytest.raises(ImgrecError):
        Augment.parse("crop=1.5")


def test_precision_falls_back_to_fp32():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu, {"avx512f"}) is None
    assert autocast_dtype("auto", cpu, {"avx512f", "avx512_bf16"}) is None  # measured no faster
    assert autocast_dtype("auto", cpu, {"avx512_bf16", "amx_bf16"}) is torch.bfloat16
    assert autocast_dtype("bf16", cpu, {"avx512_bf16"}) is torch.bfloat16
    assert autocast_dtype("bf16", cpu, set()) is None  # no bfloat16 on this CPU
    assert autocast_dtype("fp32", cpu, {"amx_bf16"}) is None


def test_lookahead_average_replaces_the_weights():
    net = torch.nn.Linear(2, 2)
    la = Lookahead(net, total_steps=10)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(Lookahead.EVERY):
        la.step(net)
    # early in the run the decay is near 0: the average follows the weights closely
    assert torch.allclose(net.weight, la.ema[0]) and not torch.allclose(net.weight, start)
    with torch.no_grad():
        net.weight.add_(5.0)
    la.finish(net)
    assert torch.equal(net.weight, la.ema[0])


def _colour_data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, :, c] = 200
    return x, y


def test_airnet_trains_saves_lookahead_weights_and_exports(tmp_path, monkeypatch):
    from imgrec.bundle import read_bundle
    from imgrec.export import export_bundle
    from imgrec.network import load_model

    made: list[Lookahead] = []

    class Recording(Lookahead):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(engine, "Lookahead", Recording)
    result = imgrec.train(_colour_data(), model="airnet", model_args={"widths": WIDTHS},
                          epochs=1, batch_size=32, optimizer="sgd", lr=0.1, lookahead=True,
                          augment="flip,crop=2", tta="flip", val_fraction=0.0,
                          out=str(tmp_path / "air"), quiet=True, tensorboard=False)
    assert len(made) == 1
    bundle = read_bundle(result.bundle.path)
    net = load_model(bundle).eval()
    saved = [t for t in net.state_dict().values() if t.is_floating_point()]
    for mine, avg in zip(saved, made[0].ema, strict=True):
        assert torch.allclose(mine, avg.to(mine.dtype), atol=1e-6)
    assert not torch.allclose(net.whiten.weight, torch.zeros(1))  # set from the data
    report = export_bundle(result.bundle.path)
    assert report.max_abs_diff < 1e-4


def test_long_recipe_only_where_one_exists(tmp_path):
    with pytest.raises(ImgrecError, match="no long recipe"):
        imgrec.train(_colour_data(), recipe="long", out=str(tmp_path / "x"), quiet=True)
