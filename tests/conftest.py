"""Shared fixtures. Tests never need the network; those that use ../shared skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CATS_DOGS = SHARED / "data" / "cats-dogs-mini"


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Caches and built-in dataset roots live in a temporary folder for the whole session."""
    base = tmp_path_factory.mktemp("imgrec-home")
    old = {k: os.environ.get(k) for k in ("IMGREC_MODELS", "IMGREC_CACHE", "IMGREC_DATA")}
    os.environ["IMGREC_MODELS"] = str(base / "models")
    os.environ["IMGREC_CACHE"] = str(base / "features")
    os.environ["IMGREC_DATA"] = str(base / "datasets")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def cats_dogs() -> Path:
    if not (CATS_DOGS / "train").is_dir():
        pytest.skip("../shared/data/cats-dogs-mini is absent")
    return CATS_DOGS


@pytest.fixture(scope="session")
def sample_photo():
    """Paths of scikit-image's sample photos (saved as JPEG once per session)."""
    from skimage import data

    folder = Path(os.environ["IMGREC_MODELS"]).parent / "photos"
    folder.mkdir(exist_ok=True)

    def get(name: str) -> Path:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).save(path, quality=92)
        return path

    return get


def make_shapes_dataset(root: Path, per_class: int = 40, size: int = 32, layout: str = "flat",
                        seed: int = 0) -> Path:
    """A tiny, learnable real-image folder dataset: bright squares vs bright discs on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    splits = {"flat": [None], "split": ["train", "validation", "test"]}[layout]
    for split in splits:
        n = per_class if split in (None, "train") else max(4, per_class // 4)
        for cls in ("disc", "square"):
            folder = root / (split or "") / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                cx, cy, r = rng.integers(10, size - 10, 2).tolist() + [int(rng.integers(5, 8))]
                mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if cls == "disc" else (
                    (abs(xx - cx) <= r) & (abs(yy - cy) <= r))
                img[mask] = rng.integers(180, 255, 3)
                Image.fromarray(img).save(folder / f"{cls}_{i:03d}.png")
    return root


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes")
