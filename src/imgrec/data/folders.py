"""How a folder dataset is read: its splits, its class folders and the files in them. One
listing for train, doctor and the label audit, so that what doctor checks is what trains.

- Hidden names (`.DS_Store`, macOS's `._photo.jpg`) and `__MACOSX/` (a zip made on macOS)
  are left out at every depth: they are never photos of a class.
- A class folder may be a symbolic link (a class kept elsewhere); symlinked folders inside a
  class folder are not followed (a link to a parent would loop).
- Two folders that name one split (`val/` and `validation/`, `Train/` and `train/`) are
  refused: one of them was silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from ..images import hidden, is_image_path

SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "val", "val": "val",
                 "valid": "val", "test": "test", "testing": "test"}
def split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when `root` has the split layout (a train/ folder), else {}."""
    found: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(p.name.lower())
        if split is not None and not hidden(p.name) and p.is_dir():
            found.setdefault(split, []).append(p)
    if "train" not in found:
        # a split-named folder that holds class folders beside the classes (test/cat/...)
        # would be trained as a class called test; one holding images is a class (valid/)
        named = sorted(p.name for folders in found.values() for p in folders
                       if any(c.is_dir() and not hidden(c.name) for c in p.iterdir()))
        if named:
            raise DataError(
                f"{root}: {', '.join(n + '/' for n in named)} named like a split, with no "
                "train/ folder beside it",
                "lay splits out as DIR/train/<class>/ with validation/ and test/ beside it; "
                f"to use one split alone, give its folder ({root / named[0]}); if it is a "
                "class, rename it")
        return {}
    for split, folders in found.items():
        if len(folders) > 1:
            names = " and ".join(f"{p.name}/" for p in folders)
            raise DataError(f"{root}: {names} both hold the {split} split; imgrec would read "
                            "only one of them", "merge them into one folder")
    return {split: folders[0] for split, folders in found.items()}


def unread_folders(root: Path) -> list[Path]:
    """The folders beside train/ that name no split (dev/, extra/): a split layout reads only
    train, validation and test, so these are reported, never silently left out."""
    if not split_folders(root):
        return []
    return sorted(p for p in root.iterdir() if not hidden(p.name) and p.is_dir()
                  and p.name.lower() not in SPLIT_ALIASES)


def unread_note(root: Path) -> str | None:
    """One line naming what a folder dataset holds but does not read, or None: folders
    beside train/ that name no split, and images outside any class folder (Kaggle's
    unlabelled test/)."""
    parts = []
    unread = unread_folders(root)
    if unread:
        parts.append(f"{', '.join(p.name + '/' for p in unread)} (the splits are train/, "
                     "validation/ (val/, valid/) and test/; rename a folder to use it)")
    for folder in [root, *split_folders(root).values()]:
        loose = [p for p in loose_files(folder) if is_image_path(p)]
        if loose:
            where = "" if folder == root else f"{folder.name}/: "
            parts.append(f"{where}{len(loose)} image(s) outside any class folder (unlabelled)")
    return f"note: {root}: not read: {'; '.join(parts)}" if parts else None


def class_folders(folder: Path) -> list[Path]:
    """The class folders of a (split) folder, sorted; a symlinked class folder is one."""
    return sorted(p for p in folder.iterdir() if not hidden(p.name) and p.is_dir())


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively, sorted by path), hidden names left out and
    symlinked subfolders not followed."""
    out = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not hidden(d)]
        out += [Path(top) / f for f in files if not hidden(f)]
    return sorted(p for p in out if p.is_file())


def loose_files(folder: Path) -> list[Path]:
    """The files beside the class folders (a README, a stray photo), sorted."""
    return sorted(p for p in folder.iterdir() if not hidden(p.name) and p.is_file())
