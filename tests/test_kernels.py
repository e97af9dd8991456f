"""The convolution demo computes what the workshops teach, `imgrec preview` draws the data
and its augmentation, every figure is labelled and every command's help has an example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import app, main
from imgrec.kernels import out_size, run


def _labelled(monkeypatch) -> list:
    from matplotlib.figure import Figure

    seen: list = []
    original = Figure.savefig

    def checked(fig, *args, **kwargs):
        for ax in fig.axes:
            if ax.axison and ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axis in {args[0]}"
                assert ax.get_title() or fig._suptitle is not None
        assert fig._suptitle is not None or all(a.get_title() for a in fig.axes if a.axison)
        seen.append(Path(getattr(args[0], "name", args[0])))  # save_figure: bytes, then rename
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    return seen


@pytest.fixture
def step_image(tmp_path):
    """Dark left half, bright right half: one vertical edge at x = 40."""
    img = np.zeros((60, 80), np.uint8)
    img[:, 40:] = 200
    path = tmp_path / "step.png"
    Image.fromarray(img).save(path)
    return path


def test_kernels_do_what_the_workshop_says(step_image):
    demo = run(step_image)
    sizes = dict(demo.sizes)
    assert sizes["input"] == (60, 80)
    assert sizes["3x3 conv, valid padding, stride 1"] == (58, 78)
    assert sizes["3x3 conv, same padding, stride 1"] == (60, 80)
    assert sizes["3x3 conv, valid padding, stride 2"] == (29, 39)
    assert sizes["3x3 conv, same padding, stride 2"] == (30, 40)
    assert sizes["ReLU + 2x2 max pooling (stride 2)"] == (30, 40)
    assert out_size(28, 5, 0, 1) == 24 and out_size(32, 3, 1, 2) == 16
    inner = (slice(5, -5), slice(5, -5))  # away from the zero-padded border
    vertical = demo.outputs["vertical edges (Sobel x)"][inner]
    horizontal = demo.outputs["horizontal edges (Sobel y)"][inner]
    cols = np.abs(vertical).max(0)
    assert cols.argmax() + 5 in (39, 40) and cols.max() > 2.5  # responds at the edge ...
    assert np.abs(np.delete(vertical, [33, 34, 35, 36], axis=1)).max() < 1e-5  # ... only
    assert np.abs(horizontal).max() < 1e-5  # a vertical edge has no horizontal component
    smooth = demo.outputs["smoothing (3x3 box blur)"][inner]
    assert smooth.min() >= 0 and np.unique(smooth.round(3)).size > 2  # the edge is blurred
    pooled = demo.outputs["ReLU then 2x2 max pooling"]
    assert pooled.min() >= 0


def test_sizes_follow_the_formula_and_tiny_images_are_refused(step_image, tmp_path, capsys):
    from imgrec.errors import InputError

    sizes = dict(run(step_image, max_side=50).sizes)
    h, w = sizes["input"]
    assert (h, w) == (38, 50)
    for padding, stride, label in ((0, 1, "valid padding, stride 1"),
                                   (1, 1, "same padding, stride 1"),
                                   (0, 2, "valid padding, stride 2"),
                                   (1, 2, "same padding, stride 2")):
        assert sizes[f"3x3 conv, {label}"] == (out_size(h, 3, padding, stride),
                                               out_size(w, 3, padding, stride))
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((2, 40), np.uint8)).save(strip)
    with pytest.raises(InputError, match="40x2 pixels .* too small for a 3x3 kernel"):
        run(strip)
    assert main(["kernels", str(strip), "--out", str(tmp_path / "k.png")]) == 2
    assert "too small" in capsys.readouterr().err


def test_kernels_cli(step_image, tmp_path, capsys, monkeypatch):
    seen = _labelled(monkeypatch)
    out = tmp_path / "k.png"
    assert main(["kernels", str(step_image), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "valid padding, stride 2" in text and "29 x 39" in text
    assert Image.open(out).size[0] > 1000 and seen == [out]
    assert main(["kernels", str(tmp_path / "missing.png")]) == 2


def test_preview_cli(shapes, tmp_path, monkeypatch):
    seen = _labelled(monkeypatch)
    out = tmp_path / "preview.png"
    assert main(["preview", str(shapes), "--out", str(out), "--per-class", "3",
                 "--augment", "strong"]) == 0
    assert Image.open(out).size[0] > 500 and seen == [out]
    assert main(["preview", str(shapes), "--augment", "wobble=1"]) == 2


def test_preview_leaves_the_slots_of_a_small_class_blank(tmp_path, monkeypatch):
    """A class of 2 images among classes of 5, 4 per class: its last 2 slots (original and
    augmented) are blank, not black tiles that look like black photos."""
    import numpy as np
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    for name, n in (("big", 5), ("small", 2)):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                tmp_path / "d" / name / f"{i}.png")
    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig),
                                                                original(fig, *a, **k))[1])
    assert main(["preview", str(tmp_path / "d"), "--out", str(tmp_path / "p.png"),
                 "--per-class", "4", "--augment", "flip"]) == 0
    (fig,) = figures
    shown = [[ax.axison for ax in fig.axes[r * 8 : (r + 1) * 8]] for r in range(2)]
    assert shown[0] == [True] * 8  # big: 4 originals, 4 augmented
    assert shown[1] == [True, True, False, False] * 2  # small: 2 of each, then blank


def test_every_command_has_an_example():
    import typer

    group = typer.main.get_command(app)
    missing = [name for name, cmd in group.commands.items()
               if "Example: imgrec " not in (cmd.help or "")]
    assert not missing, f"commands without an example in --help: {missing}"
