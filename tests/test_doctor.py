"""imgrec doctor: finds what is injected into a copy of cats-dogs-mini, and on the clean copy
reports only what is really there; quarantine moves files out and undo puts them back."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imgrec.cli import main
from imgrec.doctor import scan


def _png_bomb(path: Path, side: int = 30000) -> None:
    """A valid 1-bit side x side PNG, a few hundred KB on disk, written without allocating
    the pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1,
                                                                          0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture
def data_copy(cats_dogs, tmp_path) -> Path:
    dst = tmp_path / "cats-dogs"
    shutil.copytree(cats_dogs, dst)
    return dst


def _by_path(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for i in report.issues:
        out.setdefault(i.path, set()).add(i.kind)
    return out


def test_clean_copy_reports_only_what_is_there(data_copy):
    t0 = time.time()
    report = scan(data_copy)
    assert time.time() - t0 < 20
    assert report.files_scanned == 600
    assert report.layout == "split"
    assert report.classes == {"cat": {"train": 250, "val": 50, "total": 300},
                              "dog": {"train": 250, "val": 50, "total": 300}}
    assert report.imbalance_ratio == 1.0
    # The one real finding: dog.74 and dog.180 are the same photo of four puppies (checked by
    # eye), stored as different bytes. Nothing else.
    assert [(i.path, i.kind) for i in report.issues] == [("train/dog/dog.74.jpg",
                                                          "near-duplicate")]
    assert "dog.180.jpg" in report.issues[0].detail
    a = Image.open(data_copy / "train/dog/dog.74.jpg").convert("L").resize((32, 32))
    b = Image.open(data_copy / "train/dog/dog.180.jpg").convert("L").resize((32, 32))
    diff = sum(abs(x - y) for x, y in zip(a.getdata(), b.getdata(), strict=True)) / 1024
    assert diff < 8  # mean absolute pixel difference: truly the same picture


def test_finds_each_injected_problem(data_copy, tmp_path, capsys):
    train_cat = data_copy / "train" / "cat"
    val_cat = data_copy / "validation" / "cat"
    photo = train_cat / "cat.1.jpg"
    raw = photo.read_bytes()
    (train_cat / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (train_cat / "notes.jpg").write_text("this is a text file, not a photo\n")
    Image.open(train_cat / "cat.2.jpg").save(train_cat / "really_png.jpg", format="PNG")
    shutil.copy(train_cat / "cat.3.jpg", val_cat / "copied_from_train.jpg")
    _png_bomb(train_cat / "bomb.png")
    assert (train_cat / "bomb.png").stat().st_size < 2_000_000
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(train_cat / "cat.4.jpg").save(data_copy / "train" / "dog" / "rotated.jpg",
                                             exif=exif, quality=90)
    t0 = time.time()
    report = scan(data_copy)
    seconds = time.time() - t0
    assert seconds < 20
    found = _by_path(report)
    assert found["train/cat/truncated.jpg"] == {"truncated"}
    assert found["train/cat/notes.jpg"] == {"not-image"}
    # a PNG re-encoding of cat.2: misnamed, and truly a near duplicate of cat.2
    assert found["train/cat/really_png.jpg"] == {"wrong-extension", "near-duplicate"}
    assert any(i.path == "train/cat/really_png.jpg" and "cat.2.jpg" in i.detail
               for i in report.issues if i.kind == "near-duplicate")
    assert found["validation/cat/copied_from_train.jpg"] == {"leak"}
    leak = next(i for i in report.issues if i.kind == "leak")
    assert "train/cat/cat.3.jpg" in leak.detail and "same bytes" in leak.detail
    assert found["train/cat/bomb.png"] == {"bomb"}
    assert "30000x30000" in next(i.detail for i in report.issues if i.kind == "bomb")
    assert found["train/dog/rotated.jpg"] >= {"exif-rotated"}
    # a rotated copy of cat.4 is labelled dog: it is no duplicate (content is rotated)
    assert "leak" not in found["train/dog/rotated.jpg"]
    expected = {"train/cat/truncated.jpg", "train/cat/notes.jpg", "train/cat/really_png.jpg",
                "validation/cat/copied_from_train.jpg", "train/cat/bomb.png",
                "train/dog/rotated.jpg", "train/dog/dog.74.jpg"}
    assert set(found) == expected
    assert report.files_scanned == 606

    # CLI: problems left -> exit 1, and the last line says which (notes do not count)
    assert main(["doctor", str(data_copy)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("4 problem(s) to fix before training") and "exit status 1" in last
    assert "bomb 1" in last and "leak 1" in last and "exif" not in last
    # JSON schema, then quarantine (nothing left: exit 0) and undo
    out = tmp_path / "doctor.json"
    qdir = tmp_path / "quarantine"
    assert main(["doctor", str(data_copy), "--json", str(out), "--quarantine", str(qdir)]) == 0
    doc = json.loads(out.read_text())
    assert doc["files_scanned"] == 606
    assert {"path", "kind", "detail"} == set(doc["issues"][0])
    # the images training reads: 250 + the PNG (not the truncated, text or bomb files)
    assert doc["classes"]["cat"]["train"] == 251
    moved = {"train/cat/truncated.jpg", "train/cat/notes.jpg", "train/cat/bomb.png",
             "validation/cat/copied_from_train.jpg"}
    for rel in moved:
        assert not (data_copy / rel).exists() and (qdir / rel).is_file()
    assert (data_copy / "train/cat/really_png.jpg").exists()  # readable: reported, not moved
    manifest = json.loads((qdir / "manifest.json").read_text())
    assert {Path(m["from"]).relative_to(data_copy.resolve()).as_posix()
            for m in manifest["moved"]} == moved
    assert main(["doctor", "--undo", str(qdir / "manifest.json")]) == 0
    for rel in moved:
        assert (data_copy / rel).is_file()
    assert (train_cat / "truncated.jpg").read_bytes() == raw[: len(raw) // 2]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["doctor"]) == 2
    assert main(["doctor", "--undo", str(tmp_path / "nope.json")]) == 2
    for bad in ('{"moved": 5}', '{"moved": [5]}', '{"moved": [{"from": "a"}]}'):
        (tmp_path / "m.json").write_text(bad)  # each was an internal TypeError/KeyError
        assert main(["doctor", "--undo", str(tmp_path / "m.json")]) == 2
        assert "not a doctor quarantine manifest" in capsys.readouterr().err


def test_modes_tiny_stray_and_imbalance(tmp_path):
    """A flat dataset with one file of each unusual kind, and a 12:3 class imbalance."""
    import numpy as np

    root = tmp_path / "flat"
    a, b = root / "apples", root / "pears"
    a.mkdir(parents=True)
    b.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(a / f"{i}.jpg")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(b / f"{i}.png")
    def noise():  # distinct content per file (identical content is a duplicate)
        return rng.integers(0, 255, (48, 48), dtype=np.uint8)

    Image.fromarray(noise()).save(a / "grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 4), dtype=np.uint8)).save(a / "alpha.png")
    Image.fromarray(noise()).convert("P").save(a / "palette.gif")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).convert("CMYK").save(
        a / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (48, 48), dtype=np.uint16)).save(b / "deep.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(a / "tiny.png")
    Image.fromarray(noise()).save(root / "stray.png")
    (a / "empty.jpg").write_bytes(b"")
    report = scan(root)
    found = _by_path(report)
    assert report.layout == "flat" and report.files_scanned == 19
    for name in ("grey.png", "alpha.png", "palette.gif", "cmyk.jpg"):
        assert found[f"apples/{name}"] == {"mode"}, name
    assert found["pears/deep.png"] == {"mode"}
    assert "16" in next(i.detail for i in report.issues if i.path == "pears/deep.png")
    assert found["apples/tiny.png"] == {"tiny"}
    assert found["stray.png"] >= {"stray"}
    assert found["apples/empty.jpg"] == {"empty"}
    # (apples/empty.jpg cannot be read: training skips it, so it is not counted)
    assert report.classes["apples"]["total"] == 13 and report.classes["pears"]["total"] == 4
    assert report.imbalance_ratio == pytest.approx(3.25)
    assert found["."] == {"imbalance"}
    assert report.problems() == {"empty": 1}  # the rest are notes
    assert set(found) == {"apples/grey.png", "apples/alpha.png", "apples/palette.gif",
                          "apples/cmyk.jpg", "pears/deep.png", "apples/tiny.png", "stray.png",
                          "apples/empty.jpg", "."}


def test_a_move_that_fails_is_one_line_and_what_moved_can_be_undone(tmp_path, monkeypatch):
    """A read-only dataset: shutil.move copies a file, then cannot delete it. The copy is
    taken back, the files moved before it are in the manifest, and the error is one line."""
    from imgrec import doctor
    from imgrec.errors import DataError

    data = tmp_path / "data"
    moves = []
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (data / "cat").mkdir(parents=True, exist_ok=True)
        (data / "cat" / name).write_bytes(name.encode())
        moves.append((data / "cat" / name, tmp_path / "q" / "cat" / name, ["not-image: x"]))
    real_move = shutil.move

    def move(src, dst):
        if src.endswith("b.jpg"):
            shutil.copy(src, dst)  # what shutil.move does before it fails to delete
            raise PermissionError(13, "Permission denied")
        return real_move(src, dst)

    monkeypatch.setattr(doctor.shutil, "move", move)
    manifest = tmp_path / "q" / "manifest.json"
    with pytest.raises(DataError) as e:
        doctor.move_files(moves, data, manifest)
    assert "cannot move" in str(e.value) and "1 file(s) moved" in str(e.value)
    assert "\n" not in str(e.value)
    assert [m["from"] for m in json.loads(manifest.read_text())["moved"]] == [
        str(data / "cat" / "a.jpg")]
    assert (data / "cat" / "b.jpg").is_file() and not (tmp_path / "q" / "cat" / "b.jpg").exists()
    assert (data / "cat" / "c.jpg").is_file()
    monkeypatch.setattr(doctor.shutil, "move", real_move)
    assert doctor.undo(manifest)[0] == 1 and (data / "cat" / "a.jpg").is_file()


@pytest.mark.parametrize("during", [False, True])
def test_an_interrupted_quarantine_writes_the_manifest_of_what_moved(tmp_path, monkeypatch,
                                                                     during):
    """Ctrl-C part way through the moves (slow across file systems) left 144 files moved and
    no manifest, so --undo could not put them back. The manifest now lists what moved; a
    copy under way when the interrupt came is taken back (`during`)."""
    from imgrec import doctor

    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    moves = []
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (data / "cat" / name).write_bytes(name.encode())
        moves.append((data / "cat" / name, tmp_path / "q" / "cat" / name, ["duplicate"]))
    real_move = shutil.move

    def move(src, dst):
        if src.endswith("b.jpg"):
            if during:
                shutil.copy(src, dst)  # the copy made, the source not yet deleted
            raise KeyboardInterrupt
        return real_move(src, dst)

    monkeypatch.setattr(doctor.shutil, "move", move)
    manifest = tmp_path / "q" / "manifest.json"
    with pytest.raises(KeyboardInterrupt):
        doctor.move_files(moves, data, manifest)
    assert [m["from"] for m in json.loads(manifest.read_text())["moved"]] == [
        str(data / "cat" / "a.jpg")]
    assert (data / "cat" / "b.jpg").is_file() and not (tmp_path / "q" / "cat" / "b.jpg").exists()
    monkeypatch.setattr(doctor.shutil, "move", real_move)
    assert doctor.undo(manifest)[0] == 1
    assert sorted(p.name for p in (data / "cat").iterdir()) == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_folder_without_class_folders_says_so(tmp_path):
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 90, 20, 20)).save(tmp_path / f"{i}.jpg")
    report = scan(tmp_path)
    assert ("classes" in {i.kind for i in report.issues}
            and "no class folders" in report.text())
    assert "class counts: none" in report.text()


def test_a_split_class_without_training_images_is_empty_not_imbalanced(tmp_path, capsys):
    """DIR/{train,validation}: `owls` has validation photos but no train/owls folder, and
    `bats` has an empty train folder. Both are empty classes (the loader refuses them), and the
    imbalance ratio is over the classes that have training images."""
    import numpy as np

    rng = np.random.default_rng(1)

    def photos(folder: Path, n: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")

    photos(tmp_path / "train" / "cats", 4)
    photos(tmp_path / "train" / "dogs", 4)
    (tmp_path / "train" / "bats").mkdir()
    photos(tmp_path / "validation" / "owls", 2)
    photos(tmp_path / "validation" / "cats", 1)
    report = scan(tmp_path)
    empty = {i.path: i.detail for i in report.issues if i.kind == "empty-class"}
    assert set(empty) == {"train/bats", "train/owls"}
    assert "no training images (val 2)" in empty["train/owls"]
    assert report.imbalance_ratio == 1.0
    assert "imbalance" not in report.kinds()
    assert main(["doctor", str(tmp_path)]) == 1
    assert "empty-class 2" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "validation" / "owls")
    (tmp_path / "train" / "bats").rmdir()
    assert main(["doctor", str(tmp_path)]) == 0


def test_a_multi_frame_image_is_noted(tmp_path):
    """An animated GIF or a multi-page TIFF trains on its first frame: doctor says so."""
    from imgrec.doctor import scan

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    frames = [Image.new("RGB", (40, 40), (0, 60 * i, 0)) for i in range(3)]
    frames[0].save(tmp_path / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "b" / "pages.tif", save_all=True, append_images=frames[1:])
    found = {(i.path, i.kind): i.detail for i in scan(tmp_path).issues if i.kind == "frames"}
    assert set(found) == {("a/anim.gif", "frames"), ("b/pages.tif", "frames")}
    assert "3 frames (animated or multi-page): imgrec reads the first" in found[("a/anim.gif",
                                                                                   "frames")]
