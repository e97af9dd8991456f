"""DATA resolution: folders (both layouts), CSVs, pixel CSVs, built-ins offline and from IDX."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fake_mnist, write_idx, write_pixel_csv
from PIL import Image

from imgrec.data.builtins import read_idx
from imgrec.data.datasets import load_dataset, stratified_split
from imgrec.errors import DataError


def _folder(root: Path, counts: dict[str, int], split: str = "") -> Path:
    for cls, n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(d / f"{cls}{i}.png")
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails as it would offline (and never touches the network)."""
    calls = []

    def refuse(url, *a, **k):
        calls.append(getattr(url, "full_url", url))
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def test_flat_folder_split_stratified_and_seeded(tmp_path):
    root = _folder(tmp_path / "flat", {"cat": 40, "dog": 20, "eel": 10})
    ds = load_dataset(str(root), val_fraction=0.2, test_fraction=0.1, seed=3)
    assert ds.classes == ["cat", "dog", "eel"] and not ds.in_memory and ds.channels == 3
    assert set(ds.splits) == {"train", "val", "test"}
    assert sum(len(s) for s in ds.splits.values()) == 70
    all_paths = [p for s in ds.splits.values() for p in s.paths]
    assert len(set(all_paths)) == 70  # no image in two splits
    test = Counter(ds.splits["test"].labels.tolist())
    assert test == {0: 4, 1: 2, 2: 1}  # 10% of each class
    val = Counter(ds.splits["val"].labels.tolist())
    # classes kept in proportion: 20% of what is left of each class after the test split
    assert all(abs(val[c] - 0.2 * n) <= 0.5 for c, n in {0: 36, 1: 18, 2: 9}.items())
    for s in ds.splits.values():  # labels match the folder of each path
        for p, y in zip(s.paths, s.labels, strict=True):
            assert Path(p).parent.name == ds.classes[y]

    same = load_dataset(str(root), val_fraction=0.2, test_fraction=0.1, seed=3)
    other = load_dataset(str(root), val_fraction=0.2, test_fraction=0.1, seed=4)
    assert same.splits["test"].paths == ds.splits["test"].paths
    assert same.fingerprint() == ds.fingerprint()
    assert other.splits["test"].paths != ds.splits["test"].paths


def test_stratified_split_fractions():
    labels = np.array([0] * 50 + [1] * 10)
    rest, held = stratified_split(labels, 0.2, seed=0)
    assert len(held) == 12 and Counter(labels[held].tolist()) == {0: 10, 1: 2}
    assert len(np.intersect1d(rest, held)) == 0 and len(rest) + len(held) == 60


@pytest.mark.parametrize("val_name", ["validation", "val", "valid"])
def test_split_folder_layout(tmp_path, val_name):
    root = tmp_path / "ws"
    _folder(root, {"cats": 6, "dogs": 5}, "train")
    _folder(root, {"cats": 2, "dogs": 2}, val_name)
    _folder(root, {"cats": 3, "dogs": 1}, "test")
    ds = load_dataset(str(root))
    assert ds.classes == ["cats", "dogs"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 11, "val": 4, "test": 4}


def test_split_layout_without_validation_carves_one(tmp_path):
    root = tmp_path / "ws"
    _folder(root, {"a": 10, "b": 10}, "train")
    ds = load_dataset(str(root), val_fraction=0.2, test_fraction=0.1)
    assert len(ds.splits["val"]) == 4 and len(ds.splits["train"]) + 4 <= 20


def test_path_csv_with_and_without_split(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = ["path,label,split"]
    for i in range(12):
        Image.new("RGB", (4, 4)).save(img_dir / f"{i}.png")
        rows.append(f"imgs/{i}.png,{'yes' if i % 2 else 'no'},"
                    f"{'train' if i < 8 else 'validation' if i < 10 else 'test'}")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(csv_path))
    assert ds.classes == ["no", "yes"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert all(Path(p).is_file() for p in ds.splits["train"].paths)  # relative to the CSV

    plain = tmp_path / "plain.csv"
    plain.write_text("".join(f"{img_dir / f'{i}.png'},c{i % 2}\n" for i in range(12)))
    ds = load_dataset(str(plain), val_fraction=0.25, test_fraction=0.0)
    assert ds.classes == ["c0", "c1"] and len(ds.splits["val"]) == 4


def test_bad_csv(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty CSV"):
        load_dataset(str(empty))
    short = tmp_path / "s.csv"
    short.write_text("path,label\nonly_a_path.png\n")
    with pytest.raises(DataError, match="path and a label"):
        load_dataset(str(short))


def test_sign_language_pixel_csv(tmp_path):
    labels = [y for y in range(25) if y != 9]  # Sign-Language-MNIST: no J (9), no Z (25)
    train = write_pixel_csv(tmp_path / "sign_mnist_train.csv", labels * 3, seed=0)
    write_pixel_csv(tmp_path / "sign_mnist_test.csv", labels, seed=1)
    ds = load_dataset(str(train), val_fraction=0.1)
    assert ds.in_memory and ds.channels == 1 and ds.native_size == 28
    assert len(ds.classes) == 24 and "J" not in ds.classes and ds.classes[:3] == ["A", "B", "C"]
    assert ds.classes[9] == "K"  # label 10 is K, remapped to index 9
    assert len(ds.splits["test"]) == 24
    assert len(ds.splits["train"]) == 72 and "val" not in ds.splits  # 3 a class: none held
    x = ds.splits["test"].images
    assert x.shape == (24, 1, 28, 28) and x.dtype == np.uint8
    assert ds.splits["test"].labels.max() == 23


def test_pixel_csv_not_square(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("label,pixel1,pixel2,pixel3\n1,0,0,0\n")
    with pytest.raises(DataError, match="no square"):
        load_dataset(str(path))


def test_builtin_offline_error_names_files_and_folder(tmp_path, monkeypatch, no_network):
    root = tmp_path / "empty-data"
    root.mkdir()
    monkeypatch.setenv("IMGREC_DATA", str(root))
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in msg
    assert str(root / "mnist") in msg
    assert no_network  # a download was tried (and refused), nothing reached the network


@pytest.mark.parametrize("gz", [True, False])
def test_builtin_mnist_from_idx(tmp_path, monkeypatch, no_network, gz):
    write_fake_mnist(tmp_path, n_train=50, n_test=20, gz=gz)
    monkeypatch.setenv("IMGREC_DATA", str(tmp_path))
    ds = load_dataset("mnist", val_fraction=0.2)
    assert ds.classes == [str(i) for i in range(10)] and ds.in_memory and ds.channels == 1
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 40, "test": 20, "val": 10}
    assert ds.splits["test"].images.shape == (20, 1, 28, 28)
    assert not no_network  # nothing was downloaded
    # --data-dir wins over $IMGREC_DATA
    monkeypatch.setenv("IMGREC_DATA", str(tmp_path / "elsewhere"))
    assert len(load_dataset("mnist", data_dir=str(tmp_path)).splits["test"]) == 20


def test_idx_reader_checks(tmp_path):
    good = write_idx(tmp_path / "a", np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert read_idx(good).tolist() == np.arange(12).reshape(3, 4).tolist()
    short = tmp_path / "b"
    short.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    junk = tmp_path / "c"
    junk.write_bytes(b"not an idx file at all")
    with pytest.raises(DataError):
        read_idx(junk)


@pytest.mark.parametrize("name", ["mnsit", "imagenet-21k", "no/such/folder"])
def test_unknown_dataset(name):
    with pytest.raises(DataError) as e:
        load_dataset(name)
    assert "mnist" in str(e.value)  # the error lists the built-ins


def test_folder_with_one_class(tmp_path):
    root = _folder(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match="at least two"):
        load_dataset(str(root))


def test_not_a_dataset_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="folder or a .csv"):
        load_dataset(str(f))


def test_split_lookup_falls_back_and_errors(tmp_path):
    root = tmp_path / "ws"
    _folder(root, {"a": 4, "b": 4}, "train")
    _folder(root, {"a": 2, "b": 2}, "val")
    ds = load_dataset(str(root))
    assert ds.split("test")[0] == "val"
    with pytest.raises(DataError):
        ds.split("holdout")


def test_builtin_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """`mnist` is the built-in even where ./mnist exists; `./mnist` is the folder."""
    from imgrec.errors import DataError

    (tmp_path / "mnist" / "only-one-class").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("urllib.request.urlopen", _refuse)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_dataset("mnist", data_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="class folder"):
        load_dataset("./mnist")


def _refuse(*args, **kwargs):
    raise OSError("no network in tests")


def test_small_classes_keep_a_training_image_and_no_split_is_empty():
    """Holding out a share of a class never takes its last image (a class no training image
    teaches is refused), and a share too small to hold any image out makes no split at all,
    not an empty one (training on 4 photos a class once ran to the end, then failed)."""
    from imgrec.data.datasets import Split, carve_splits, stratified_split

    labels = np.array([0, 0, 0] + [1] * 12)
    rest, held = stratified_split(labels, 0.89, 0)
    assert set(labels[rest]) == {0, 1} and (labels[rest] == 0).sum() == 1
    splits = {"train": Split(np.array([0] * 4 + [1] * 4))}
    assert carve_splits(splits, val_fraction=0.1, test_fraction=0.1, seed=0) == ["test", "val"]
    assert set(splits) == {"train"} and len(splits["train"]) == 8

    from imgrec.data.datasets import Dataset

    ds = Dataset("tiny", ["a", "b"], 3, splits, False, unheld=["test", "val"])
    assert ds.describe() == ("tiny: 2 classes, train 8 (no test or validation images held "
                             "out: a share of each class is too small to hold an image out)")
    with pytest.raises(DataError, match="no 'test' split: a share of each class") as e:
        ds.split("test")
    assert "DIR/test/<class>/" in e.value.hint
    splits = {"train": Split(np.array([0] * 10 + [1] * 10))}
    carve_splits(splits, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "test": 2, "val": 2}


def test_csv_headers_blank_lines_and_bad_rows(tmp_path):
    """Any header (a byte-order mark too) is a header, not a class; blank lines are skipped;
    a row without a label, or with a split that is not train/val/test, is refused by line."""
    from imgrec.errors import DataError

    for cls in ("cat", "dog"):
        for i in range(3):
            Image.new("RGB", (20, 20), (90 * i, 0, 0)).save(tmp_path / f"{cls}{i}.png")
    rows = "".join(f"{c}{i}.png,{c}\n" for c in ("cat", "dog") for i in range(3))
    for header in ("image,class\n", "\ufeffpath,label\n", ""):
        (tmp_path / "d.csv").write_text(header + rows + "\n\n", encoding="utf-8")
        ds = load_dataset(str(tmp_path / "d.csv"), val_fraction=0.0, test_fraction=0.0)
        assert ds.classes == ["cat", "dog"] and len(ds.splits["train"]) == 6, header
    for bad, needle in (("cat0.png,\n", "line 9: every row needs a path and a label"),
                        (",dog\n", "line 9: every row needs"),
                        ("cat0.png,cat,tset\n", "line 9: unknown split 'tset'")):
        (tmp_path / "d.csv").write_text("path,label\n" + rows + "\n" + bad)
        with pytest.raises(DataError, match=needle):
            load_dataset(str(tmp_path / "d.csv"))


def test_a_class_without_training_images_is_refused_by_the_folders_it_has(tmp_path):
    """train/{cat,dog} and validation/{cat,bird}: the message names validation/bird (where
    the class is), not a train/bird that does not exist; a flat empty class folder by name."""
    from PIL import Image

    from imgrec.errors import DataError

    for folder in ("train/cat", "train/dog", "validation/cat", "validation/bird", "flat/a"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "x.png")
    (tmp_path / "flat" / "b").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert "'bird' (validation/bird) have no training images" in str(e.value)
    assert "train/bird" not in str(e.value)
    with pytest.raises(DataError, match=r"class folder\(s\) 'b' hold no images"):
        load_dataset(str(tmp_path / "flat"))


def _macos_residue(root: Path, real_photo: Path) -> None:
    """What a zip made on macOS leaves: AppleDouble `._name` files beside the photos and in
    __MACOSX/, a .DS_Store, and a photo hidden by its name."""
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._cat0.png").write_bytes(apple_double)
    (root / "cat" / "._cat0.png").write_bytes(apple_double)
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / ".thumbs").mkdir()
    (root / "cat" / ".thumbs" / "t.png").write_bytes(real_photo.read_bytes())
    (root / "cat" / ".hidden.png").write_bytes(real_photo.read_bytes())


def test_hidden_files_and_macos_folders_are_neither_classes_nor_images(tmp_path):
    """__MACOSX/ became a third class (trained on no readable image, then predicted for a
    fifth of the photos) and `.hidden.png` was trained on, while doctor left both out: train
    and doctor now read one listing."""
    from imgrec.doctor import scan

    root = _folder(tmp_path / "d", {"cat": 6, "dog": 6})
    _macos_residue(root, root / "dog" / "dog0.png")
    ds = load_dataset(str(root), val_fraction=0.0, test_fraction=0.0)
    assert ds.classes == ["cat", "dog"]
    paths = [Path(p).name for s in ds.splits.values() for p in s.paths]
    assert sorted(paths) == sorted([f"cat{i}.png" for i in range(6)] +
                                   [f"dog{i}.png" for i in range(6)])
    report = scan(root)
    assert sorted(report.classes) == ["cat", "dog"] and report.files_scanned == 12
    assert not [i for i in report.issues if i.kind in ("empty-class", "unreadable")]


def test_a_symlinked_class_folder_is_read_by_train_and_doctor_alike(tmp_path):
    """A class kept elsewhere and linked in: train used it, doctor saw no images in it and
    stopped `imgrec doctor DIR && imgrec train DIR` with an empty-class problem."""
    from imgrec.doctor import scan

    root = _folder(tmp_path / "d", {"cat": 5})
    store = _folder(tmp_path / "store", {"dog": 5})
    (root / "dog").symlink_to(store / "dog", target_is_directory=True)
    (store / "dog" / "loop").symlink_to(store, target_is_directory=True)  # not followed
    ds = load_dataset(str(root), val_fraction=0.0, test_fraction=0.0)
    assert ds.classes == ["cat", "dog"] and len(ds.splits["train"]) == 10
    report = scan(root)
    assert {c: n["total"] for c, n in report.classes.items()} == {"cat": 5, "dog": 5}
    assert not [i for i in report.issues if i.kind == "empty-class"]


@pytest.mark.parametrize("names", [("val", "validation"), ("test", "testing"),
                                   ("train", "Train")])
def test_two_folders_naming_one_split_are_refused(tmp_path, names):
    """val/ and validation/ both: one was dropped without a word (which one depended on the
    file system's order)."""
    from imgrec.doctor import scan

    _folder(tmp_path, {"cat": 3, "dog": 3}, "train")
    for name in names:
        _folder(tmp_path, {"cat": 2, "dog": 2}, name)
    for read in (lambda: load_dataset(str(tmp_path)), lambda: scan(tmp_path)):
        with pytest.raises(DataError) as e:
            read()
        assert f"{names[0]}/ and {names[1]}/ both hold the" in str(e.value) or \
            f"{names[1]}/ and {names[0]}/ both hold the" in str(e.value)
        assert "merge them" in e.value.hint


def test_a_split_named_folder_beside_class_folders_is_refused(tmp_path):
    """test/ beside cat/ and dog/ (no train/) was trained as a third class called test."""
    from imgrec.doctor import scan

    _folder(tmp_path, {"cat": 3, "dog": 3})
    _folder(tmp_path, {"cat": 2, "dog": 2}, "test")
    for read in (lambda: load_dataset(str(tmp_path)), lambda: scan(tmp_path)):
        with pytest.raises(DataError, match=r"test/ named like a split, with no train/"):
            read()


def test_folders_beside_train_that_name_no_split_are_reported(tmp_path, capsys):
    """dev/ beside train/ and test/ was left out without a word by train and doctor."""
    from imgrec.doctor import scan

    for split in ("train", "dev", "test"):
        _folder(tmp_path, {"cat": 3, "dog": 3}, split)
    ds = load_dataset(str(tmp_path))
    assert "not read: dev/ (the splits are" in capsys.readouterr().err
    assert "not read: dev/" in ds.notes[0]
    report = scan(tmp_path)
    assert [(i.path, i.kind) for i in report.issues if i.kind == "unread"] == [("dev/", "unread")]
    assert "unread" not in report.problems()  # a note: it alone leaves the exit status at 0


def _photos(folder: Path) -> str:
    for cls in ("cat", "dog"):
        for i in range(4):
            Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(folder / f"{cls}{i}.png")
    return "".join(f"{c}{i}.png,{c}\n" for c in ("cat", "dog") for i in range(4))


def test_a_path_csv_lists_each_image_once(tmp_path, capsys):
    """A repeated row was trained twice and could land in train and test at once (a leak);
    one path with two labels was trained as both."""
    rows = _photos(tmp_path)
    (tmp_path / "d.csv").write_text("path,label\n" + rows + "cat0.png,cat\ncat1.png,cat\n")
    ds = load_dataset(str(tmp_path / "d.csv"), val_fraction=0.0, test_fraction=0.0)
    assert len(ds.splits["train"]) == 8 and "2 repeated row(s) used once" in \
        capsys.readouterr().err
    (tmp_path / "d.csv").write_text("path,label\n" + rows + "cat0.png,dog\n")
    with pytest.raises(DataError, match=r"lines 2 and 10: cat0.png is listed as 'cat' \(train\) "
                                        r"and 'dog' \(train\)"):
        load_dataset(str(tmp_path / "d.csv"))


def test_a_path_csv_header_names_its_columns(tmp_path):
    """`label,path` was read by position (30 classes named after the paths), and a third
    column `weight` was taken for the split."""
    rows = _photos(tmp_path)
    swapped = "".join(f"{lab},{p}\n" for p, lab in (r.split(",") for r in rows.split()))
    (tmp_path / "a.csv").write_text("label,path\n" + swapped)
    (tmp_path / "b.csv").write_text("path,label,weight\n" + rows.replace("\n", ",1.0\n"))
    for name in ("a.csv", "b.csv"):
        ds = load_dataset(str(tmp_path / name), val_fraction=0.0, test_fraction=0.0)
        assert ds.classes == ["cat", "dog"] and len(ds.splits["train"]) == 8, name
    # a third column named otherwise whose values are splits is the split column
    split = [("test" if i % 4 == 0 else "train") for i in range(8)]
    (tmp_path / "c.csv").write_text("path,label,partition\n" + "".join(
        f"{row},{s}\n" for row, s in zip(rows.split(), split, strict=True)))
    ds = load_dataset(str(tmp_path / "c.csv"), val_fraction=0.0)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "test": 2}


def test_a_path_csv_whose_paths_are_all_missing_is_refused_before_training(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text(_photos(tmp_path))  # paths relative to tmp_path
    with pytest.raises(DataError, match="none of its image paths is a file .*read from the "
                                        "CSV's folder"):
        load_dataset(str(tmp_path / "sub" / "d.csv"))


def test_pixel_csv_rows_are_checked_by_line(tmp_path):
    """A blank last line or a short row was "non-numeric values" (no line); a negative label
    wrapped round to the last class; values over 255 were clipped; a label found only in the
    test file became a class no image teaches; a test file of another image size was used."""
    train = write_pixel_csv(tmp_path / "x_train.csv", [0, 1, 2] * 4, side=4)
    test = write_pixel_csv(tmp_path / "x_test.csv", [0, 1, 2], side=4)
    text = train.read_text()
    train.write_text(text + "\n\n")
    assert len(load_dataset(str(train)).classes) == 3
    cases = ((text + "1,2,3\n", "line 14: 3 cells where the first row has 17"),
             (text + "-1," + ",".join(["0"] * 16) + "\n", "line 14: a negative label"),
             (text + "1," + ",".join(["300"] * 16) + "\n", "line 14: .*outside 0-255"),
             (text + "1," + ",".join(["0.5"] * 16) + "\n", "line 14: '0.5' is not a whole"))
    for content, needle in cases:
        train.write_text(content)
        with pytest.raises(DataError, match=needle):
            load_dataset(str(train))
    train.write_text(text)
    write_pixel_csv(test, [0, 1, 7], side=4)
    with pytest.raises(DataError, match=r"label\(s\) 7 have no training image"):
        load_dataset(str(train))
    write_pixel_csv(test, [0, 1, 2], side=5)
    with pytest.raises(DataError, match="5x5 images, where x_train.csv has 4x4"):
        load_dataset(str(train))


def test_class_names_that_differ_only_by_case_are_noted(tmp_path, capsys):
    _folder(tmp_path, {"Cat": 3, "cat": 3, "dog": 3})
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["Cat", "cat", "dog"]
    assert "classes Cat and cat differ only by case" in capsys.readouterr().err


def test_unlabelled_images_in_a_split_folder_are_noted_and_no_leak(tmp_path, capsys):
    """Kaggle's test/ of unlabelled images beside train/<class>/: train left them out
    without a word, and doctor called one of them a leak although nothing reads it."""
    import shutil

    from imgrec.doctor import scan

    _folder(tmp_path, {"cat": 3, "dog": 3}, "train")
    (tmp_path / "test").mkdir()
    shutil.copy(tmp_path / "train" / "cat" / "cat0.png", tmp_path / "test" / "1.png")
    load_dataset(str(tmp_path))
    assert "test/: 1 image(s) outside any class folder (unlabelled)" in capsys.readouterr().err
    assert "leak" not in scan(tmp_path).problems()


def test_a_class_named_like_a_split_still_trains(tmp_path):
    """valid/ and invalid/ are classes (their images are directly inside): refusing every
    split-named folder without train/ broke them, in the studio too."""
    from imgrec.doctor import scan

    _folder(tmp_path, {"valid": 3, "invalid": 3})
    assert load_dataset(str(tmp_path)).classes == ["invalid", "valid"]
    assert set(scan(tmp_path).classes) == {"invalid", "valid"}
