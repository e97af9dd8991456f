"""CIFAR-10 is read from its binary version (no pickle), extracted or as the tar.gz."""

from __future__ import annotations

import io
import tarfile

import numpy as np

from imgrec.data.datasets import load_dataset


def _records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    return np.concatenate([labels[:, None], pixels], 1).tobytes(), labels, pixels


def _batches() -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    return {name: _records(4, seed) for seed, name in enumerate(names)}


def test_extracted_binary_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    batches = _batches()
    for name, (raw, _, _) in batches.items():
        (folder / name).write_bytes(raw)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert ds.channels == 3 and ds.native_size == 32 and ds.classes[3] == "cat"
    train, test = ds.splits["train"], ds.splits["test"]
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    _, labels, pixels = batches["test_batch.bin"]
    assert np.array_equal(test.labels, labels)
    # channel-major records: the first 1024 bytes are the red plane
    assert np.array_equal(test.images[0, 0].ravel(), pixels[0, :1024])


def test_tar_archive(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    batches = _batches()
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name, (raw, _, _) in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert len(ds.splits["train"]) == 20 and len(ds.splits["test"]) == 4
    assert np.array_equal(ds.splits["train"].labels[:4], batches["data_batch_1.bin"][1])


def test_default_recipe_trains(tmp_path):
    """The cifar10 recipe (res-cnn, flip + shift, flip TTA) runs end to end."""
    import imgrec

    test_extracted_binary_batches(tmp_path)
    result = imgrec.train("cifar10", data_dir=str(tmp_path), epochs=1, batch_size=8,
                          out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    assert result.bundle.architecture["name"] == "res-cnn"
    assert result.bundle.preprocess.tta == ("flip",)
    assert result.test_metrics["n"] == 4
