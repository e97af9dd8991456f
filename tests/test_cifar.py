"""CIFAR-10 is read from its binary version (no pickle), extracted or as the tar.gz, whole or
partial (a missing test batch is replaced by a stratified, seeded held-out split); the real
batch in ../shared/data/cifar10-dev trains, exports and predicts through ONNX Runtime."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import cifar_records, write_cifar
from PIL import Image

from imgrec.cli import main
from imgrec.data.builtins import BUILTINS
from imgrec.data.datasets import builtin_key, load_dataset


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
    """The cifar10 recipe (airnet, flip + crop, lookahead, flip TTA) runs end to end."""
    import torch

    import imgrec
    from imgrec.training.config import TrainConfig
    from imgrec.training.plan import recipe_variant
    from imgrec.training.recipes import RECIPES

    test_extracted_binary_batches(tmp_path)
    result = imgrec.train("cifar10", data_dir=str(tmp_path), epochs=1, batch_size=8,
                          out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    assert result.bundle.architecture["name"] == "airnet"
    assert result.bundle.preprocess.tta == ("flip",)
    assert result.test_metrics["n"] == 4
    # this machine's default (long where bfloat16 is fast), and --recipe short
    long = recipe_variant(TrainConfig(data="cifar10"), "cifar10", torch.device("cpu")) == "long"
    widths = RECIPES["cifar10-long" if long else "cifar10"]["model_args"]["widths"]
    assert result.bundle.architecture["args"]["widths"] == widths
    short = imgrec.train("cifar10", data_dir=str(tmp_path), epochs=1, batch_size=8,
                         recipe="short", out=str(tmp_path / "short"), quiet=True,
                         tensorboard=False)
    assert short.bundle.architecture["args"]["widths"] == RECIPES["cifar10"]["model_args"][
        "widths"]
    # naming the folder that holds the batches is the same dataset, with the same recipe
    by_path = imgrec.train(str(tmp_path / "cifar10"), epochs=1, batch_size=8,
                           out=str(tmp_path / "run2"), quiet=True, tensorboard=False)
    assert by_path.bundle.architecture["name"] == "airnet"
    assert by_path.bundle.preprocess.tta == ("flip",)


# ---- partial CIFAR-10: some batches, no test batch (synthetic files, fast) -----------------

PARTIAL_LINE = ("cifar10: 2 of 5 training batches (data_batch_1.bin, data_batch_3.bin; 100 "
                "images); no test_batch.bin: holding out 10% of the training images as the test "
                "split (stratified, seed 0)")


def test_partial_batches_hold_out_a_stratified_seeded_test_split(tmp_path, capsys):
    write_cifar(tmp_path, batches=(1, 3), test=False, n=50)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0, test_fraction=0.1)
    assert capsys.readouterr().err.strip().splitlines() == [PARTIAL_LINE]
    assert ds.notes == [PARTIAL_LINE] and ds.name == "cifar10"
    train, test = ds.splits["train"], ds.splits["test"]
    assert (len(train), len(test)) == (90, 10) and "val" not in ds.splits
    assert np.bincount(test.labels, minlength=10).tolist() == [1] * 10  # stratified
    # test images are not in train
    seen = {x.tobytes() for x in train.images}
    assert not any(x.tobytes() in seen for x in test.images)
    # the same seed (what `imgrec evaluate` uses from the bundle) gives the same split ...
    again = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0, test_fraction=0.1)
    assert np.array_equal(again.splits["test"].images, test.images)
    assert again.fingerprint() == ds.fingerprint()
    # ... another seed another one; a validation split is carved from the rest
    other = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.1, seed=1)
    assert not np.array_equal(other.splits["test"].images, test.images)
    assert len(other.splits["val"]) == 10 and len(other.splits["train"]) == 80


def test_partial_batches_with_test_batch(tmp_path, capsys):
    write_cifar(tmp_path, batches=(2,), test=True, layout="")  # files directly in cifar10/
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert capsys.readouterr().err.strip() == (
        "cifar10: 1 of 5 training batches (data_batch_2.bin; 20 images); test_batch.bin: 20 "
        "test images")
    assert len(ds.splits["train"]) == 20 and len(ds.splits["test"]) == 20


def test_all_training_batches_no_test_batch(tmp_path, capsys):
    write_cifar(tmp_path, test=False)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0, test_fraction=0.2)
    assert capsys.readouterr().err.strip() == (
        "cifar10: 5 of 5 training batches; no test_batch.bin: holding out 20% of the training "
        "images as the test split (stratified, seed 0)")
    assert len(ds.splits["test"]) == 20


def test_complete_set_prints_nothing(tmp_path, capsys):
    write_cifar(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert capsys.readouterr().err == "" and ds.notes == []


def test_partial_tar_archive(tmp_path, capsys):
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name, raw in [("data_batch_4.bin", cifar_records(10, 4)),
                          ("batches.meta.txt", b"a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n")]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert "1 of 5 training batches (data_batch_4.bin; 10 images)" in capsys.readouterr().err
    assert ds.classes == list("abcdefghij")  # class names from batches.meta.txt
    assert len(ds.splits["train"]) + len(ds.splits.get("test", ())) == 10  # 1 a class: kept


def test_a_folder_holding_the_batches_is_cifar10(tmp_path, capsys):
    """`imgrec train DIR` where DIR holds cifar-10-batches-bin/ (or is it): CIFAR-10, with the
    same split as `imgrec train cifar10 --data-dir`; class folders stay a folder dataset."""
    folder = write_cifar(tmp_path / "root", batches=(1,), test=False)
    by_name = load_dataset("cifar10", data_dir=tmp_path / "root", val_fraction=0.0)
    for path in (folder.parent, folder):
        ds = load_dataset(str(path), val_fraction=0.0)
        assert ds.name == "cifar10" and ds.in_memory and ds.source == str(path)
        assert ds.fingerprint() == by_name.fingerprint()
    assert builtin_key(str(folder.parent)) == "cifar10" == builtin_key("cifar10")  # its recipe
    # --data-dir naming the folder that holds cifar-10-batches-bin/ works too
    ds = load_dataset("cifar10", data_dir=folder.parent, val_fraction=0.0)
    assert ds.fingerprint() == by_name.fingerprint()
    assert "no test_batch.bin" in capsys.readouterr().err
    shapes = tmp_path / "shapes"
    for cls in ("a", "b"):
        (shapes / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(shapes / cls / f"{i}.png")
    ds = load_dataset(str(shapes))
    assert ds.classes == ["a", "b"] and not ds.in_memory and builtin_key(str(shapes)) is None


@pytest.mark.parametrize("size", [3073 * 20 - 100, 3073 * 20 + 1, 0])
def test_truncated_batch_is_one_error_line(tmp_path, capsys, size):
    folder = write_cifar(tmp_path, batches=(1, 2), test=False)
    path = folder / "data_batch_2.bin"
    path.write_bytes((path.read_bytes() * 2)[:size])
    code = main(["train", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"imgrec: error: {path}: not a whole CIFAR-10 batch ({size:,} bytes")


def test_wrong_format_and_no_training_batch(tmp_path, capsys):
    folder = write_cifar(tmp_path, batches=(1,), test=False)
    raw = bytearray(cifar_records(3, 1))
    raw[3073] = 57  # a label byte no CIFAR-10 class has (CIFAR-100's records are 3,074 bytes)
    (folder / "data_batch_1.bin").write_bytes(bytes(raw))
    assert main(["train", "cifar10", "--data-dir", str(tmp_path)]) == 2
    assert "record 1 has label 57, not a CIFAR-10 class" in capsys.readouterr().err
    (folder / "data_batch_1.bin").unlink()
    (folder / "test_batch.bin").write_bytes(cifar_records(3, 1))
    assert main(["train", "cifar10", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CIFAR-10 training batch" in err and len(err.strip().splitlines()) == 1


# ---- the real files (../shared/data/cifar10-dev: data_batch_1.bin only) --------------------

CIFAR_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-dev"


@pytest.fixture(scope="module")
def real_cifar():
    if not (CIFAR_DEV / "cifar-10-batches-bin" / "data_batch_1.bin").is_file():
        pytest.skip(f"{CIFAR_DEV} is absent (the real CIFAR-10 batch lives in ../shared)")
    return CIFAR_DEV


def test_real_batch_reads_correctly(real_cifar, capsys):
    ds = load_dataset(str(real_cifar), val_fraction=0.0)
    meta = (real_cifar / "cifar-10-batches-bin" / "batches.meta.txt").read_text().split()
    assert ds.classes == meta == list(BUILTINS["cifar10"].classes)
    assert "1 of 5 training batches (data_batch_1.bin; 10,000 images); no test_batch.bin: " \
        "holding out 10%" in capsys.readouterr().err
    train, test = ds.splits["train"], ds.splits["test"]
    assert (len(train), len(test)) == (9000, 1000)
    assert np.bincount(test.labels).tolist() == [100] * 10  # 1,000 per class, 10% of each
    # channel-major pixels: CIFAR-10's per-channel means are (125.3, 123.0, 113.9); a
    # row-major misreading would mix the channels and flatten them towards one value
    x = np.concatenate([train.images, test.images])
    means = x.mean(axis=(0, 2, 3))
    assert np.allclose(means, (125.3, 123.0, 113.9), atol=3), means
    # and the images are images: neighbouring pixels correlate strongly
    rows = x[:500, :, :, :-1].astype(float).ravel(), x[:500, :, :, 1:].astype(float).ravel()
    assert np.corrcoef(*rows)[0, 1] > 0.8


@pytest.mark.parametrize("model", ["cifar-cnn", "res-cnn"])
def test_real_images_train_export_and_predict_through_onnx(real_cifar, tmp_path, model):
    """100 real images, one epoch, the cifar10 recipe (flip + shift, flip TTA) with
    the workshop net and the default one: the bundle exports to ONNX, ONNX Runtime agrees with
    PyTorch, and `evaluate` re-creates the held-out split the run was tested on."""
    import imgrec
    from imgrec.evaluation import evaluate_bundle
    from imgrec.export import export_bundle
    from imgrec.predict import Predictor

    root = tmp_path / "data"
    folder = root / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    src = real_cifar / "cifar-10-batches-bin"
    with (src / "data_batch_1.bin").open("rb") as f:
        (folder / "data_batch_1.bin").write_bytes(f.read(100 * 3073))
    (folder / "batches.meta.txt").write_bytes((src / "batches.meta.txt").read_bytes())

    result = imgrec.train("cifar10", model=model, data_dir=str(root), epochs=1, batch_size=64,
                          out=str(tmp_path / "run"), quiet=True, tensorboard=False)
    bundle = result.bundle
    assert bundle.architecture["name"] == model and bundle.preprocess.tta == ("flip",)
    n_test = bundle.training["splits"]["test"]
    # (the workshop net holds out validation too: another network's training, not airnet's)
    assert sum(bundle.training["splits"].values()) == 100 and 6 <= n_test <= 14
    assert result.test_metrics["n"] == n_test

    report = export_bundle(bundle.path)
    assert report.max_abs_diff < 1e-4
    test = load_dataset("cifar10", data_dir=root, val_fraction=0.0).splits["test"]
    onnx = Predictor.load(bundle.path, engine="onnx")
    torch_ = Predictor.load(bundle.path, engine="torch")
    got, expected = onnx.probabilities(test.images), torch_.probabilities(test.images)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95

    again = evaluate_bundle(bundle.path, "cifar10", data_dir=str(root), engine="torch")
    assert again.n == n_test and again.accuracy == pytest.approx(result.test_metrics["accuracy"])
    assert np.array_equal(again.y_true, test.labels)


def test_the_archive_wins_over_a_half_extracted_folder(tmp_path, capsys):
    test_tar_archive(tmp_path)  # the complete archive in <root>/cifar10/
    write_cifar(tmp_path, batches=(1,), test=False)  # ... beside a partial extraction
    ds = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert len(ds.splits["train"]) == 20 and capsys.readouterr().err == ""


def test_a_neighbouring_folder_is_suggested(tmp_path, capsys, monkeypatch):
    """--data-dir ../shared/data, where CIFAR-10 sits in cifar10-dev/, not cifar10/: the error
    names the folder that has it instead of asking for a download."""
    from imgrec.cli import main

    monkeypatch.setattr("urllib.request.urlopen", _no_network)
    write_cifar(tmp_path / "src", batches=(1,), test=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "src" / "cifar10").rename(tmp_path / "data" / "cifar10-dev")
    assert main(["train", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cifar10-dev/ holds its files" in err
    assert f"--data-dir {tmp_path / 'data' / 'cifar10-dev'}" in err


def _no_network(*args, **kwargs):
    raise OSError("no network in tests")


def test_default_recipe_is_long_only_where_bfloat16_is_fast():
    """cifar10's default is its long recipe on a GPU or a CPU with AMX (it fits 15 minutes
    there), else the short one; --recipe and --precision fp32 decide over it."""
    import torch

    from imgrec.training.config import TrainConfig
    from imgrec.training.plan import recipe_variant

    cpu, cfg = torch.device("cpu"), TrainConfig(data="cifar10")
    assert recipe_variant(cfg, "cifar10", cpu, {"amx_bf16", "avx512_bf16"}) == "long"
    assert recipe_variant(cfg, "cifar10", cpu, {"avx512_bf16"}) == "short"
    assert recipe_variant(cfg, "cifar10", torch.device("cuda"), set()) == "long"
    assert recipe_variant(cfg, "mnist", cpu, {"amx_bf16"}) == "short"
    assert recipe_variant(cfg, None, cpu, {"amx_bf16"}) == "short"
    fp32 = TrainConfig(data="cifar10", precision="fp32")
    assert recipe_variant(fp32, "cifar10", cpu, {"amx_bf16"}) == "short"
    for asked in ("short", "long"):
        cfg = TrainConfig(data="cifar10", recipe=asked)
        assert recipe_variant(cfg, "cifar10", cpu, {"amx_bf16"}) == asked
        assert recipe_variant(cfg, "cifar10", cpu, set()) == asked


def test_recipe_long_with_another_network_is_refused_not_dropped(tmp_path, capsys):
    """--recipe long with --model resnet18 planned the generic training without a word:
    the long recipe is airnet's."""
    write_cifar(tmp_path, batches=(1,), test=False)
    assert main(["train", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet18",
                 "--recipe", "long", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--recipe long is cifar10's recipe for airnet" in err and "Traceback" not in err
