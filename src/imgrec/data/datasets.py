"""Turn a DATA argument into labelled splits.

DATA is a built-in name (mnist, fashion-mnist, cifar10), a folder (`DIR/<class>/*` split
stratified with a seed, or `DIR/{train,validation|val|valid,test}/<class>/*`), a CSV of
`path,label[,split]`, or a pixel CSV (`label,pixel1..pixelN`, Sign-Language-MNIST / Kaggle).
A folder holding CIFAR-10's binary batches (`cifar-10-batches-bin/`, the batches themselves or
`cifar-10-binary.tar.gz`) is CIFAR-10, whole or partial.
Small datasets live in memory as uint8 arrays; folders and path CSVs stay as file lists that
a DataLoader streams.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import is_image_path
from .builtins import BUILTINS, CifarArrays, find_cifar, load_arrays, load_cifar, read_cifar
from .folders import SPLIT_ALIASES, class_folders, files_under, split_folders, unread_note


@dataclass
class Split:
    """One split: labels, plus either in-memory pixels or file paths."""

    labels: np.ndarray
    images: np.ndarray | None = None  # uint8 N x C x H x W
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(
            self.labels[idx],
            None if self.images is None else self.images[idx],
            None if self.paths is None else [self.paths[i] for i in idx],
        )


@dataclass
class Dataset:
    name: str
    classes: list[str]
    channels: int
    splits: dict[str, Split]
    in_memory: bool
    native_size: int | None = None  # side of in-memory images
    source: str = ""
    notes: list[str] = field(default_factory=list)
    #: splits asked for but not held out: each class too small for its share (carve_splits)
    unheld: list[str] = field(default_factory=list)

    def split(self, name: str) -> tuple[str, Split]:
        """A split by name; 'test' falls back to 'val' (and says so) when there is no test."""
        name = SPLIT_ALIASES.get(name, name)
        if name in self.splits:
            return name, self.splits[name]
        if name == "test" and "val" in self.splits:
            return "val", self.splits["val"]
        if name in self.unheld:
            raise DataError(f"{self.name} has no {name!r} split: {self.unheld_reason()}",
                            f"add images, or lay them out as DIR/{_FOLDER_OF[name]}/<class>/")
        raise DataError(
            f"{self.name} has no {name!r} split", f"choose one of {', '.join(self.splits)}"
        )

    def unheld_reason(self) -> str:
        return "a share of each class is too small to hold an image out"

    def fingerprint(self) -> str:
        """A short hash of the classes, split sizes and file names (ties results to data)."""
        h = hashlib.sha256(self.name.encode())
        h.update("|".join(self.classes).encode())
        for key in sorted(self.splits):
            s = self.splits[key]
            h.update(f"{key}:{len(s)}:".encode())
            h.update(np.ascontiguousarray(s.labels).tobytes())
            if s.paths is not None:
                h.update("\n".join(s.paths).encode())
            elif s.images is not None:
                h.update(hashlib.sha256(s.images[:: max(1, len(s) // 64)].tobytes()).digest())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        unheld = "" if not self.unheld else (
            f" (no {' or '.join(_FOLDER_OF[s] for s in self.unheld)} images held out: "
            f"{self.unheld_reason()})")
        return f"{self.name}: {len(self.classes)} classes, {sizes}{unheld}"


_FOLDER_OF = {"val": "validation", "test": "test", "train": "train"}


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with about `fraction` of each class held out."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        # at least one image of each class stays: a class no training image teaches is refused
        n = min(math.floor(len(idx) * fraction + 0.5), len(idx) - 1)
        held.append(idx[:n])
        rest.append(idx[n:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def carve_splits(splits: dict[str, Split], val_fraction: float, test_fraction: float,
                 seed: int) -> list[str]:
    """Add the missing validation/test splits, stratified, from train (a CSV or folder of
    test images alone has no train split to carve from, and needs none to be evaluated);
    the splits asked for that a share of each class too small to hold an image out left
    without any (`Dataset.unheld`: train and evaluate say so)."""
    unheld: list[str] = []
    if "train" not in splits:
        return unheld
    for name, fraction, salt in (("test", test_fraction, 0), ("val", val_fraction, 1)):
        if name in splits or fraction <= 0:
            continue
        rest, held = stratified_split(splits["train"].labels, fraction, seed + salt)
        if len(held):
            splits[name], splits["train"] = (splits["train"].subset(held),
                                             splits["train"].subset(rest))
        else:  # too few images to hold any out: no such split (not an empty one)
            unheld.append(name)
    return unheld


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """{class: its image files} (the listing doctor checks: `folders`)."""
    return {d.name: [p for p in files_under(d) if is_image_path(p)] for d in class_folders(folder)}


def case_note(classes: list[str], where: Path) -> str | None:
    """A note on class names that differ only by case (Cat/ and cat/): two classes here,
    one folder on macOS and Windows, and labels a reader cannot tell apart."""
    by_lower: dict[str, list[str]] = {}
    for c in classes:
        by_lower.setdefault(c.casefold(), []).append(c)
    alike = [" and ".join(v) for v in by_lower.values() if len(v) > 1]
    if not alike:
        return None
    return (f"note: {where}: classes {'; '.join(alike)} differ only by case: they are "
            "separate classes here, one folder on macOS and Windows")


def _no_training_images(path: Path, split_dirs: dict[str, Path], empty: list[str]) -> DataError:
    """The refusal of classes no training image teaches, naming the folders that exist:
    an empty class folder, or (split layout) the other splits' folders of a class that has
    no train/ folder at all."""
    if "train" not in split_dirs:
        names = ", ".join(repr(c) for c in empty)
        return DataError(f"{path}: class folder(s) {names} hold no images",
                         "add images to them, or remove them (imgrec doctor lists them)")
    where = []
    for c in empty:
        here = [f"{d.name}/{c}" for _, d in sorted(split_dirs.items()) if (d / c).is_dir()]
        where.append(f"{c!r} ({', '.join(here)})")
    return DataError(f"{path}: class(es) {', '.join(where)} have no training images",
                     "add images under train/<class>/, or remove the class from every split "
                     "(imgrec doctor lists them)")


def _folder(path: Path, val_fraction: float, test_fraction: float, seed: int) -> Dataset:
    split_dirs = split_folders(path)
    if split_dirs:
        per_split = {s: _class_files(d) for s, d in split_dirs.items()}
    else:
        per_split = {"train": _class_files(path)}
    classes = sorted(set().union(*[set(v) for v in per_split.values()]))
    empty = [c for c in classes if not per_split["train"].get(c)]
    if empty:  # a class no image teaches: the model would still predict it
        raise _no_training_images(path, split_dirs, empty)
    if len(classes) < 2:
        raise DataError(
            f"{path}: found {len(classes)} class folder(s); a folder dataset needs at least two",
            "lay it out as DIR/<class>/*.jpg or DIR/train/<class>/*.jpg",
        )
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, by_class in per_split.items():
        paths = [str(f) for c in classes for f in by_class.get(c, [])]
        labels = np.array([index[c] for c in classes for _ in by_class.get(c, [])], np.int64)
        if len(paths):
            splits[split] = Split(labels, paths=paths)
    if "train" not in splits:
        raise DataError(f"{path}: no images found", "put .jpg/.png files in the class folders")
    unheld = carve_splits(splits, val_fraction,
                          test_fraction if "val" not in split_dirs else 0.0, seed)
    notes = [n for n in [unread_note(path), case_note(classes, path)] if n]
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    return Dataset(path.name, classes, 3, splits, in_memory=False, source=str(path),
                   notes=notes, unheld=unheld)


def _csv(path: Path, val_fraction: float, test_fraction: float, seed: int) -> Dataset:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None
    numbered = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]  # no blanks
    if not numbered:
        raise DataError(f"{path}: empty CSV", "write one `path,label` row per image")
    header = [h.strip().lower() for h in numbered[0][1]]
    if header and header[0] == "label" and len(header) > 1 and header[1].startswith("pixel"):
        return _pixel_csv(path, rows, val_fraction, test_fraction, seed)
    columns = _header_columns(header)
    if columns is not None or _is_header(header, path.parent):
        numbered = numbered[1:]
    if columns is not None and columns[2] is None:
        columns = (*columns[:2], _split_column(numbered, columns[:2]))
    by_split = _csv_rows(path, numbered, columns or (0, 1, 2))
    classes = sorted({label for v in by_split.values() for _, label in v})
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        s: Split(np.array([index[y] for _, y in v], np.int64), paths=[p for p, _ in v])
        for s, v in by_split.items()
    }
    unheld = carve_splits(splits, val_fraction, test_fraction, seed)
    notes = [n for n in [case_note(classes, path)] if n]
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    return Dataset(path.stem, classes, 3, splits, in_memory=False, source=str(path),
                   notes=notes, unheld=unheld)


#: a CSV's first row is a header when its first two cells are such names (or any words
#: that are not an image file's path)
_HEADER_NAMES = {"path", "filename", "file", "image", "img", "filepath", "image_path"}


def _is_header(cells: list[str], root: Path) -> bool:
    if len(cells) < 2:
        return False
    if cells[0] in _HEADER_NAMES:
        return True
    first = Path(cells[0])
    return not is_image_path(first) and not (first if first.is_absolute() else root / first
                                             ).is_file()


#: header names of a path CSV's columns, so `label,path` or `path,label,weight` are read by
#: name (positional otherwise: path, label, split)
_LABEL_NAMES = {"label", "class", "category", "target", "y"}
_SPLIT_NAMES = {"split", "subset", "set"}


def _header_columns(header: list[str]) -> tuple[int, int, int | None] | None:
    """(path, label, split) column indices when the first row names a path and a label
    column, else None. A third column named otherwise (weight) is no split."""
    find = lambda names: next((i for i, h in enumerate(header) if h in names), None)  # noqa: E731
    path, label = find(_HEADER_NAMES), find(_LABEL_NAMES)
    if path is None or label is None:
        return None
    split = find(_SPLIT_NAMES)
    if split is None and len(header) < 3:  # a third column the header leaves unnamed
        split = 2
    return path, label, split


def _split_column(numbered: list[tuple[int, list[str]]], taken: tuple[int, int]) -> int | None:
    """The column a header names otherwise (`partition`, `fold`) whose every value names a
    split (train, val, test...), as the positional `path,label,split` would be read; None when
    there is none (`weight`)."""
    width = max((len(r) for _, r in numbered), default=0)
    for i in range(width):
        if i in taken:
            continue
        values = {r[i].strip().lower() for _, r in numbered if i < len(r) and r[i].strip()}
        if values and values <= set(SPLIT_ALIASES):
            return i
    return None


def _cells(row: list[str], columns: tuple[int, int, int | None]) -> tuple[str, str, str]:
    """(path, label, split) of a row, "" for a cell it lacks."""
    cells = [c.strip() for c in row]
    return tuple(cells[i] if i is not None and i < len(cells) else "" for i in columns)


def _csv_rows(path: Path, numbered: list[tuple[int, list[str]]],
              columns: tuple[int, int, int | None] = (0, 1, 2)
              ) -> dict[str, list[tuple[str, str]]]:
    """{split: [(image path, label)]} from `path,label[,split]` rows (or the columns a header
    names); a row without a path or a label, or with a split that is not train/val/test, is
    refused by its line number. A path listed twice is used once when its rows agree and
    refused when they give two labels or two splits (a leak into the test score)."""
    by_split: dict[str, list[tuple[str, str]]] = {}
    seen: dict[str, tuple[int, str, str]] = {}
    for n, row in numbered:
        name, label, split_cell = _cells(row, columns)
        if not name or not label:
            raise DataError(f"{path}, line {n}: every row needs a path and a label",
                            "write `path,label[,split]` rows")
        split = SPLIT_ALIASES.get(split_cell.lower(), "") if split_cell else "train"
        if not split:
            raise DataError(f"{path}, line {n}: unknown split {split_cell!r}",
                            "use train, val (validation) or test")
        file = str(Path(name) if Path(name).is_absolute() else path.parent / name)
        if file in seen and seen[file][1:] != (label, split):
            first, was, where = seen[file]
            raise DataError(f"{path}, lines {first} and {n}: {name} is listed as {was!r} "
                            f"({where}) and {label!r} ({split})", "keep one row per image")
        if file not in seen:
            seen[file] = (n, label, split)
            by_split.setdefault(split, []).append((file, label))
    _check_csv_rows(path, by_split, len(numbered) - len(seen))
    return by_split


def _check_csv_rows(path: Path, by_split: dict[str, list[tuple[str, str]]],
                    repeated: int) -> None:
    """Refuse a CSV none of whose paths is a file (before a model is built: relative paths
    are the CSV folder's); note rows repeated."""
    if not by_split:
        raise DataError(f"{path}: no image rows", "write one `path,label` row per image")
    if not any(Path(f).is_file() for v in by_split.values() for f, _ in v):
        first = next(iter(by_split.values()))[0][0]
        raise DataError(f"{path}: none of its image paths is a file (the first: {first}); "
                        f"relative paths are read from the CSV's folder, {path.parent}",
                        "write paths relative to the CSV's folder, or absolute ones")
    if repeated:
        print(f"note: {path}: {repeated} repeated row(s) used once", file=sys.stderr,
              flush=True)


def _read_pixel_csv(path: Path, rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 1 x S x S images and their labels from `label,pixel1..pixelN` rows (the
    header row, when there is one, and blank rows left out); a bad row is refused by its
    line number."""
    numbered = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]
    if numbered and not numbered[0][1][0].strip().lstrip("-").isdigit():
        numbered = numbered[1:]  # the header
    if not numbered:
        raise DataError(f"{path}: no image rows", "write one `label,pixel1..pixelN` row per image")
    width = len(numbered[0][1])
    for n, r in numbered:
        if len(r) != width:
            raise DataError(f"{path}, line {n}: {len(r)} cells where the first row has {width}")
    try:
        arr = np.array([r for _, r in numbered], dtype=np.int64)
    except ValueError:
        n, cell = next((n, c) for n, r in numbered for c in r if not c.strip().isdigit()
                       and not (c.strip().startswith("-") and c.strip()[1:].isdigit()))
        raise DataError(f"{path}, line {n}: {cell.strip()!r} is not a whole number",
                        "labels and pixels (0-255) are whole numbers") from None
    bad = np.flatnonzero((arr[:, 0] < 0) | (arr[:, 1:] < 0).any(1) | (arr[:, 1:] > 255).any(1))
    if len(bad):
        raise DataError(f"{path}, line {numbered[bad[0]][0]}: a negative label, or a pixel "
                        "outside 0-255", "labels are 0, 1, 2 ...; pixels are 0-255")
    n_pixels = arr.shape[1] - 1
    side = math.isqrt(n_pixels)
    if side * side != n_pixels:
        raise DataError(f"{path}: {n_pixels} pixel columns is no square image")
    return arr[:, 1:].astype(np.uint8).reshape(-1, 1, side, side), arr[:, 0]


def sign_letter(label: int) -> str:
    """A Sign-Language-MNIST label's class name: 0 -> A, 1 -> B ... (training names a pixel
    CSV's classes so when its file says "sign"; evaluate maps a held-out copy's digits so)."""
    return chr(65 + label)


def _pixel_csv(path: Path, rows, val_fraction: float, test_fraction: float, seed: int) -> Dataset:
    """Sign-Language-MNIST / Kaggle digit layout: label,pixel1..pixelN, one image per row.
    A sibling file with 'test' in place of 'train' in its name is the test split: it must
    hold images of the same size, and no class without training images."""
    x, y = _read_pixel_csv(path, rows)
    splits = {"train": Split(y, images=x)}
    if "train" in path.name:
        test_path = path.with_name(path.name.replace("train", "test"))
        if test_path.is_file():
            with test_path.open(newline="", encoding="utf-8-sig") as f:
                tx, ty = _read_pixel_csv(test_path, list(csv.reader(f)))
            if tx.shape[1:] != x.shape[1:]:
                raise DataError(f"{test_path}: {tx.shape[-1]}x{tx.shape[-1]} images, where "
                                f"{path.name} has {x.shape[-1]}x{x.shape[-1]}")
            untaught = sorted(set(ty.tolist()) - set(y.tolist()))
            if untaught:
                raise DataError(f"{test_path}: label(s) {', '.join(map(str, untaught))} have "
                                f"no training image in {path.name}",
                                "add training rows for them, or remove their test rows")
            splits["test"] = Split(ty, images=tx)
    labels = sorted(set(y.tolist()))
    sign = "sign" in path.name.lower() and max(labels) < 26
    classes = [sign_letter(i) if sign else str(i) for i in labels]
    remap = np.full(max(labels) + 1, -1, np.int64)
    remap[labels] = np.arange(len(labels))
    for s in splits.values():
        s.labels = remap[s.labels]
    unheld = carve_splits(splits, val_fraction, test_fraction, seed)
    return Dataset(path.stem, classes, 1, splits, in_memory=True, native_size=x.shape[-1],
                   source=str(path), unheld=unheld)


def _builtin(name: str, data_dir, val_fraction: float, test_fraction: float,
             seed: int) -> Dataset:
    if name == "cifar10":
        return _cifar(load_cifar(data_dir), f"builtin:{name}", val_fraction, test_fraction, seed)
    spec = BUILTINS[name]
    tx, ty, vx, vy = load_arrays(name, data_dir)
    splits = {"train": Split(ty, images=tx), "test": Split(vy, images=vx)}
    carve_splits(splits, val_fraction, 0.0, seed)
    return Dataset(name, list(spec.classes), tx.shape[1], splits, in_memory=True,
                   native_size=tx.shape[-1], source=f"builtin:{name}")


def _cifar(c: CifarArrays, source: str, val_fraction: float, test_fraction: float,
           seed: int) -> Dataset:
    """CIFAR-10, whole or partial. Without test_batch.bin the test split is held out of the
    training batches (stratified, seeded: `imgrec evaluate` re-creates the same split from the
    fraction and seed the bundle records); the note saying so is printed, a warning about the
    data rather than progress."""
    splits = {"train": Split(c.train_y, images=c.train_x)}
    if c.test_x is not None:
        splits["test"] = Split(c.test_y, images=c.test_x)
    carve_splits(splits, val_fraction, test_fraction, seed)
    notes = [n for n in [c.note(test_fraction, seed)] if n]
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    return Dataset("cifar10", list(c.classes), 3, splits, in_memory=True, native_size=32,
                   source=source, notes=notes)


def _cifar_source(path: Path) -> Path | None:
    """CIFAR-10 binary data a DATA path names: a folder holding cifar-10-batches-bin/ (or the
    batches themselves, or the archive), or the archive file."""
    if path.is_dir():
        return find_cifar(path)
    if path.is_file() and path.name.lower().startswith("cifar-10-binary.tar"):
        return path
    return None


def builtin_key(data: str) -> str | None:
    """The built-in dataset DATA means (its recipe applies): a bare built-in name, or a path to
    CIFAR-10's binary files; None for folders and CSVs."""
    key = data.lower()
    if key in BUILTINS and os.sep not in data and "/" not in data:
        return key
    return "cifar10" if _cifar_source(Path(data).expanduser()) is not None else None


def load_dataset(
    data: str,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Resolve DATA (built-in name, folder or CSV) into a Dataset."""
    key = data.lower()
    if key in BUILTINS and os.sep not in data and "/" not in data:
        # A bare built-in name means the built-in; a folder of that name is `./mnist`.
        return _builtin(key, data_dir, val_fraction, test_fraction, seed)
    path = Path(data).expanduser()
    cifar = _cifar_source(path)
    if cifar is not None:  # a folder holding cifar-10-batches-bin/ (or the batches, or the
        # archive): CIFAR-10, not a `DIR/<class>/*` folder
        return _cifar(read_cifar(cifar), str(path), val_fraction, test_fraction, seed)
    if path.is_dir():
        return _folder(path, val_fraction, test_fraction, seed)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv(path, val_fraction, test_fraction, seed)
    if path.is_file():
        raise DataError(f"{data}: a dataset is a folder or a .csv file, not this file")
    raise DataError(
        f"{data!r} is neither a built-in dataset ({', '.join(BUILTINS)}) nor an existing "
        f"folder or CSV file",
        "check the spelling or the path",
    )
