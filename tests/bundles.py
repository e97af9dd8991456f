"""Tiny model bundles for the export and serve tests: built, not trained (seconds)."""

from __future__ import annotations

from pathlib import Path

CLASSES = ["disc", "square", "triangle"]


def make_tiny_bundle(path: Path, channels: int = 3, size: int = 32, export: bool = True,
                     int8: bool = False) -> Path:
    """A small `fast-cnn` bundle (random weights, seeded) with model.onnx when `export`."""
    import torch

    from imgrec.bundle import Bundle
    from imgrec.contract import Preprocess
    from imgrec.export import export_bundle
    from imgrec.models.registry import build_model
    from imgrec.network import save_bundle

    torch.manual_seed(0)
    args = {"in_channels": channels, "num_classes": len(CLASSES), "image_size": size}
    net = build_model("fast-cnn", **args)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so exports are really checked
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    bundle = Bundle(Path(path), {"name": "fast-cnn", "args": args}, list(CLASSES),
                    Preprocess(input_size=size, channels=channels, mean=(0.5,) * channels,
                               std=(0.5,) * channels),
                    extra={"display_name": "tiny-shapes"})
    save_bundle(bundle, net.eval())
    if export:
        export_bundle(path, int8=int8)
    return Path(path)
