"""The dataset doctor: look through a folder dataset before training on it.

Per file: unreadable or truncated images, content that does not match the extension,
non-images, EXIF-rotated photos, unusual modes, tiny images, decompression-bomb sizes (from
the header, never decoding the pixels), exact duplicates (content hash) and near duplicates
(a 64-bit difference hash), flagged as leaks when they cross train/validation/test; and the
class counts with the imbalance ratio. Decoding goes through images.decode_image (the one
decoder) in threads, since Pillow releases the GIL while it decodes.

`quarantine` moves flagged files out (never rewrites or deletes them) and writes a manifest
that `undo` uses to put every file back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bundle import atomic_write_text
from .data.folders import (
    class_folders,
    files_under,
    loose_files,
    split_folders,
    unread_folders,
)
from .errors import DataError, UnreadableImage, one_line
from .images import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, open_image, sniff_format

#: Smaller than this (shortest side, pixels) is "tiny": too little to learn from.
TINY = 32
#: dHash Hamming distance at or under which two different files count as near duplicates.
NEAR_DISTANCE = 5
#: A train-split class imbalance (largest / smallest) at or over this is reported.
IMBALANCE = 3.0
#: Kinds `--quarantine` moves out (the others are worth knowing but harmless to train on).
#: kinds of a file training cannot read (it skips the file)
UNREADABLE_KINDS = ("empty", "not-image", "unreadable", "truncated", "bomb")
QUARANTINE_KINDS = (*UNREADABLE_KINDS, "duplicate", "leak")
#: Kinds that make a dataset wrong to train or evaluate on (files the loader skips, copies
#: that inflate the test score, classes nothing teaches): `imgrec doctor` exits 1 while any
#: is left. The other kinds are notes: worth knowing, harmless to train on.
PROBLEM_KINDS = QUARANTINE_KINDS + ("empty-class", "classes")
MANIFEST = "manifest.json"

_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".gif": "GIF",
               ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM",
               ".pgm": "PPM"}
_UNUSUAL_MODES = {"1": "1-bit", "L": "greyscale (L)", "LA": "greyscale with alpha (LA)",
                  "P": "palette (P)", "PA": "palette with alpha (PA)", "RGBA": "RGBA (alpha)",
                  "CMYK": "CMYK", "YCbCr": "YCbCr", "I": "32-bit integer (I)",
                  "I;16": "16-bit (I;16)", "I;16B": "16-bit (I;16B)", "I;16L": "16-bit (I;16L)",
                  "F": "32-bit float (F)", "LAB": "LAB", "HSV": "HSV"}
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Issue:
    path: str
    kind: str
    detail: str


@dataclass
class FileInfo:
    path: Path
    rel: str
    split: str | None
    label: str | None
    sha256: str = ""
    dhash: int | None = None
    size: tuple[int, int] | None = None
    issues: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DoctorReport:
    root: Path
    files_scanned: int
    issues: list[Issue]
    classes: dict[str, dict[str, int]]
    imbalance_ratio: float | None
    layout: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"files_scanned": self.files_scanned,
                "issues": [asdict(i) for i in self.issues],
                "classes": self.classes, "imbalance_ratio": self.imbalance_ratio,
                "layout": self.layout, "data": str(self.root)}

    def kinds(self) -> Counter:
        return Counter(i.kind for i in self.issues)

    def problems(self, moved: tuple[str, ...] = ()) -> Counter:
        """The problems left, by kind, once the files of the `moved` kinds are gone."""
        return Counter(i.kind for i in self.issues
                       if i.kind in PROBLEM_KINDS and i.kind not in moved)

    def flagged(self, kinds: tuple[str, ...] = QUARANTINE_KINDS) -> list[str]:
        """Relative paths of files with an issue of one of `kinds` (each once, in order)."""
        seen: dict[str, None] = {}
        for i in self.issues:
            if i.kind in kinds and i.path != ".":
                seen.setdefault(i.path, None)
        return list(seen)

    def text(self) -> str:
        lines = [f"{self.root}: {self.files_scanned} files scanned ({self.layout} layout) in "
                 f"{self.seconds:.1f}s"]
        names = sorted(self.classes)
        splits = sorted({s for c in self.classes.values() for s in c if s != "total"},
                        key=lambda s: _SPLIT_ORDER.get(s, 9))
        lines.append("class counts: " + ("none" if not names else "; ".join(
            f"{n} {self.classes[n]['total']}" + (" (" + ", ".join(
                f"{s} {self.classes[n].get(s, 0)}" for s in splits) + ")" if splits else "")
            for n in names)))
        if self.imbalance_ratio is not None:
            lines.append(f"imbalance ratio (largest / smallest class in train): "
                         f"{self.imbalance_ratio:.2f}")
        if not self.issues:
            lines.append("no issues found")
            return "\n".join(lines)
        lines.append(f"{len(self.issues)} issue(s): " + ", ".join(
            f"{k} {n}" for k, n in sorted(self.kinds().items())))
        width = max(len(i.kind) for i in self.issues)
        for i in self.issues:
            lines.append(one_line(f"  {i.kind:<{width}}  {i.path}: {i.detail}"))
        return "\n".join(lines)


# -- scanning ------------------------------------------------------------------------------
def _layout(root: Path) -> tuple[str, dict[str, Path]]:
    """('split', {split: dir}) for DIR/{train,validation,test}/<class>/*, else ('flat', ...)."""
    splits = split_folders(root)
    if splits:
        return "split", splits
    return "flat", {"": root}


def list_files(root: Path) -> tuple[str, list[FileInfo]]:
    """(layout, every file under the class folders and images beside them), as doctor and
    the label audit see a folder dataset."""
    layout, split_dirs = _layout(root)
    files: list[FileInfo] = []
    for split, folder in split_dirs.items():
        # files beside the class folders (README, SOURCE.md ...): only images are reported
        here = [FileInfo(p, str(p.relative_to(root)), split or None, None)
                for p in loose_files(folder) if is_imageish(p)]
        here += [FileInfo(p, str(p.relative_to(root)), split or "train", d.name)
                 for d in class_folders(folder) for p in files_under(d)]
        files += sorted(here, key=lambda f: f.path)
    return layout, files


def is_imageish(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _dhash(img: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 greyscale thumbnail brighter than its
    right neighbour. Robust to resizing and recompression, cheap to compare (Hamming)."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def _check(info: FileInfo) -> FileInfo:
    """All per-file checks. Reads the header first; decodes (at reduced JPEG scale) only what
    is safe to decode."""
    try:
        data = info.path.read_bytes()
    except OSError as e:
        info.issues.append(("unreadable", f"cannot read the file ({e.strerror})"))
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    if info.label is None:
        info.issues.append(("stray", "an image outside any class folder: the loader ignores it"))
    if not data:
        info.issues.append(("empty", "0 bytes"))
        return info
    fmt = _check_format(info, data)
    if fmt is not None and _check_header(info, data, fmt):
        _check_pixels(info, data)
    return info


def _check_format(info: FileInfo, data: bytes) -> str | None:
    """The format the content says (None, with an issue, for no image) against the name's."""
    fmt = sniff_format(data[:16])
    ext = info.path.suffix.lower()
    if fmt is None:
        what = "text" if _looks_like_text(data[:512]) else "unknown binary data"
        info.issues.append(("not-image", f"content is {what}, not an image" +
                            ("" if ext in IMAGE_EXTENSIONS else
                             f" (the loader skips {ext or 'extensionless'} files)")))
        return None
    expected = _EXT_FORMAT.get(ext)
    if expected and expected != fmt:
        info.issues.append(("wrong-extension", f"named {ext} but the content is {fmt}"))
    elif ext not in IMAGE_EXTENSIONS:
        info.issues.append(("wrong-extension", f"a {fmt} image named {ext or '(no extension)'}:"
                                               " the loader skips it"))
    return fmt


def _check_header(info: FileInfo, data: bytes, fmt: str) -> bool:
    """Size, mode and orientation from the header alone (no pixel decoded). False when the
    pixels must not or cannot be decoded (a broken header, a decompression bomb)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = open_image(data, fmt)  # reads the header only, no pixels
            w, h = header.size
            mode = header.mode
            orientation = header.getexif().get(0x0112, 1)
            frames = getattr(header, "n_frames", 1)  # an animated GIF, a multi-page TIFF
    except Exception as e:
        info.issues.append(("unreadable", f"{fmt} header is broken ({type(e).__name__}: {e})"))
        return False
    info.size = (w, h)
    if w * h > MAX_PIXELS:
        info.issues.append(("bomb", f"{w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                                    f"{MAX_PIXELS / 1e6:.0f} MP limit: a decompression bomb "
                                    "(read from the header, not decoded)"))
        return False
    if orientation not in (1, None, 0):
        info.issues.append(("exif-rotated", f"EXIF orientation {orientation}: stored "
                                            f"{_ORIENT.get(orientation, 'transformed')}; "
                                            "imgrec applies it, other tools may not"))
    bit16 = fmt == "PNG" and len(data) > 25 and data[24] == 16
    if mode in _UNUSUAL_MODES or bit16:
        desc = _UNUSUAL_MODES.get(mode, mode) + (", 16 bits per channel" if bit16 else "")
        info.issues.append(("mode", f"{desc}: converted to RGB when loaded"))
    if min(w, h) < TINY:
        info.issues.append(("tiny", f"{w}x{h} pixels (under {TINY} on a side)"))
    if isinstance(frames, int) and frames > 1:
        info.issues.append(("frames", f"{frames} frames (animated or multi-page): imgrec reads "
                                      "the first"))
    return True


def _check_pixels(info: FileInfo, data: bytes) -> None:
    """Decode (at reduced JPEG scale) through the one decoder: truncated or corrupt pixels,
    and the difference hash for near duplicates."""
    try:
        img = decode_image(data, channels=3, draft_size=(64, 64))
    except UnreadableImage as e:
        msg = e.message.split(": ", 1)[-1]
        kind = "truncated" if "truncat" in msg.lower() else "unreadable"
        info.issues.append((kind, msg))
        return
    info.dhash = _dhash(img)


_ORIENT = {2: "mirrored", 3: "upside down", 4: "flipped vertically", 5: "transposed",
           6: "rotated 90 degrees", 7: "transversed", 8: "rotated 270 degrees"}


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _where(f: FileInfo) -> str:
    return f"{f.rel} ({f.split or 'no split'}/{f.label or 'no class'})"


def _describe(f: FileInfo, first: FileInfo, how: str, layout: str, kind: str) -> Issue:
    if f.label and first.label and f.label != first.label:
        how += f"; labelled {f.label} here but {first.label} there"
    if layout == "split" and f.split != first.split:
        return Issue(f.rel, "leak", f"{f.split} image also in {first.split}: {how}")
    return Issue(f.rel, kind, how)


def _group_issues(groups: list[list[FileInfo]], layout: str) -> list[Issue]:
    """For each group of identical files, keep the first (train first) as the original and
    flag the others: a leak when one sits in another split than the original."""
    out = []
    for g in groups:
        g = sorted(g, key=lambda f: (_SPLIT_ORDER.get(f.split or "", 9), f.rel))
        out += [_describe(f, g[0], f"same bytes as {_where(g[0])}", layout, "duplicate")
                for f in g[1:]]
    return out


def _near_issues(pairs: list[tuple[FileInfo, FileInfo, int]], layout: str) -> list[Issue]:
    return [_describe(f, first, f"looks like {_where(first)} (dHash distance {d} of 64)",
                      layout, "near-duplicate") for first, f, d in pairs]


def _near_pairs(files: list[FileInfo], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for dHash pairs within max_distance, chunked to bound memory."""
    hashes = np.array([f.dhash for f in files], dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), 1024):
        block = hashes[start : start + 1024]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        for a, b in zip(*np.nonzero(dist <= max_distance), strict=True):
            i = start + int(a)
            if i < int(b):
                pairs.append((i, int(b), int(dist[a, b])))
    return pairs


def scan(data: str | Path, workers: int | None = None,
         near_distance: int = NEAR_DISTANCE) -> DoctorReport:
    """Scan a folder dataset (DIR/<class>/* or DIR/{train,validation,test}/<class>/*)."""
    import time

    t0 = time.time()
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{data}: not a folder", "doctor scans a folder dataset "
                        "(DIR/<class>/*.jpg or DIR/train/<class>/*.jpg)")
    layout, files = list_files(root)
    if not files:
        raise DataError(f"{root}: no files found", "lay it out as DIR/<class>/*.jpg")
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        files = list(pool.map(_check, files))
    issues = [Issue(f.rel, k, d) for f in files for k, d in f.issues]
    issues += _duplicate_issues([f for f in files if f.label], layout, near_distance)
    classes = _class_counts(files)
    ratio, balance = _balance(classes)
    issues += balance + _empty_classes(root, classes) + [
        Issue(f"{p.name}/", "unread", "a folder beside train/ that names no split: train "
              "reads train/, validation/ (val/, valid/) and test/ only")
        for p in unread_folders(root)]
    order = {f.rel: i for i, f in enumerate(files)}
    issues.sort(key=lambda i: (order.get(i.path, -1), i.kind))
    return DoctorReport(root, len(files), issues, classes, ratio, layout, time.time() - t0)


def _duplicate_issues(files: list[FileInfo], layout: str, near_distance: int) -> list[Issue]:
    """Exact duplicates (same bytes), then near duplicates: one representative per distinct
    content, dHash within the distance; each pair flags its later file (train first), against
    its closest look-alike."""
    by_hash: dict[str, list[FileInfo]] = defaultdict(list)
    for f in files:
        if f.sha256 and not any(k == "empty" for k, _ in f.issues):
            by_hash[f.sha256].append(f)
    issues = _group_issues([g for g in by_hash.values() if len(g) > 1], layout)
    reps = [g[0] for g in by_hash.values() if g[0].dhash is not None]
    best: dict[int, tuple[int, int]] = {}
    for i, j, d in _near_pairs(reps, near_distance) if reps else []:
        first, second = sorted((i, j), key=lambda k: (_SPLIT_ORDER.get(reps[k].split or "", 9),
                                                       reps[k].rel))
        if second not in best or d < best[second][1]:
            best[second] = (first, d)
    return issues + _near_issues([(reps[a], reps[b], d) for b, (a, d) in best.items()], layout)


def _empty_classes(root: Path, classes: dict[str, dict[str, int]]) -> list[Issue]:
    """Classes with no training image: the loader refuses them (a class no image teaches
    would still be predicted). A class folder under train/ with nothing in it, and, in the
    split layout, a class that has validation or test images but no train/ folder at all."""
    layout, split_dirs = _layout(root)
    train = split_dirs["train"] if layout == "split" else root
    issues = [Issue(str(d.relative_to(root)), "empty-class",
                    "no images in this class folder: add some, or remove it")
              for d in class_folders(train) if not classes.get(d.name, {}).get("train")]
    named = {i.path for i in issues}
    for label, counts in classes.items():
        where = str((train / label).relative_to(root))
        if not counts.get("train") and where not in named:
            elsewhere = ", ".join(f"{s} {n}" for s, n in counts.items() if s != "total")
            issues.append(Issue(where, "empty-class", f"no training images ({elsewhere}): "
                                f"add some under {where}/, or remove the class"))
    return issues


def _class_counts(files: list[FileInfo]) -> dict[str, dict[str, int]]:
    """Images per class and split (what the loader would train on: image-named files in class
    folders that can be read), with each class's total."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for f in files:
        if f.label and is_imageish(f.path) and not any(k in UNREADABLE_KINDS
                                                        for k, _ in f.issues):
            counts[f.label][f.split or "train"] += 1
            counts[f.label]["total"] += 1
    return {c: dict(sorted(v.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 9)))
            for c, v in sorted(counts.items())}


def _balance(classes: dict[str, dict[str, int]]) -> tuple[float | None, list[Issue]]:
    """The train split's imbalance ratio (largest / smallest class), and the dataset-wide
    issues: fewer than two classes, or a ratio at or over IMBALANCE. A class with no training
    image is not in the ratio: it is an empty class (`_empty_classes`), not an imbalance."""
    if not classes:
        return None, [Issue(".", "classes", "no class folders: a folder dataset is "
                            "DIR/<class>/*.jpg or DIR/train/<class>/*.jpg")]
    if len(classes) < 2:
        return _ratio(classes), [Issue(".", "classes", f"only {len(classes)} class "
                                       "folder(s); a classifier needs at least two")]
    taught = {c: v["train"] for c, v in classes.items() if v.get("train")}
    ratio = _ratio(classes)
    if ratio is None or ratio < IMBALANCE:
        return ratio, []
    small, big = min(taught, key=taught.get), max(taught, key=taught.get)
    return ratio, [Issue(".", "imbalance", f"train has {taught[big]} {big} but {taught[small]} "
                         f"{small} (ratio {ratio:.1f}); imgrec train weighs the loss by class")]


def _ratio(classes: dict[str, dict[str, int]]) -> float | None:
    """Largest / smallest training count over the classes that have training images."""
    counts = [v["train"] for v in classes.values() if v.get("train")]
    return round(max(counts) / min(counts), 3) if counts else None


# -- quarantine and undo -------------------------------------------------------------------
def quarantine(report: DoctorReport, folder: str | Path,
               kinds: tuple[str, ...] = QUARANTINE_KINDS) -> Path:
    """Move the flagged files to `folder` (same relative paths) and write the manifest that
    `undo` reads. Files are moved, never rewritten or deleted."""
    folder = Path(folder).expanduser().resolve()
    root = report.root.resolve()
    if folder == root or root in folder.parents:
        raise DataError(f"{folder}: the quarantine folder must be outside the dataset",
                        "choose a folder beside it, e.g. DATA-quarantine")
    manifest = folder / MANIFEST
    if manifest.exists():
        raise DataError(f"{manifest} exists: that folder already holds a quarantine",
                        f"undo it first (imgrec doctor --undo {manifest}) or choose another folder")
    by_path: dict[str, list[str]] = defaultdict(list)
    for i in report.issues:
        if i.kind in kinds and i.path != ".":
            by_path[i.path].append(f"{i.kind}: {i.detail}")
    moves = [(root / rel, folder / rel, reasons) for rel, reasons in by_path.items()]
    return move_files(moves, root, manifest)


def move_files(moves: list[tuple[Path, Path, list[str]]], root: Path, manifest: Path) -> Path:
    """Move each (from, to, reasons) that still exists, never rewriting or deleting a file,
    and write the manifest `undo` reads (quarantine and `--apply-fixes` both come here),
    also when the moves stop part way (Ctrl-C, a full disk): what moved can be put back."""
    moved: list[dict] = []
    failed, current = None, None
    try:
        for src, dst, reasons in moves:
            if not src.exists():
                continue
            current = (src, dst, reasons)
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
            except OSError as e:  # a read-only dataset: shutil.move copied, then could not delete
                failed = f"cannot move {src} ({e.strerror or e})"
                break
            current = None
            moved.append({"from": str(src), "to": str(dst), "reasons": reasons})
    finally:
        _settle(current, moved)
        if moved or failed is None:  # what did move can always be undone
            record = {"data": str(root),
                      "created": datetime.now(UTC).isoformat(timespec="seconds"),
                      "moved": moved, "undo": f"imgrec doctor --undo {manifest}"}
            atomic_write_text(manifest, json.dumps(record, indent=2) + "\n")
    if failed:
        done = (f"{len(moved)} file(s) moved before it: imgrec doctor --undo {manifest} puts "
                "them back" if moved else "nothing was moved")
        raise DataError(f"{failed}; {done}", "make the dataset folder writable, then run again")
    return manifest


def _settle(current: tuple[Path, Path, list[str]] | None, moved: list[dict]) -> None:
    """The move that was under way when the loop stopped: copied but not yet deleted (across
    file systems), the copy goes and the file stays where it was, once; done, it is recorded."""
    if current is None:
        return
    src, dst, reasons = current
    if src.exists():
        if dst.is_file():
            dst.unlink(missing_ok=True)
    elif dst.exists():
        moved.append({"from": str(src), "to": str(dst), "reasons": reasons})


def undo(manifest: str | Path) -> tuple[int, list[str]]:
    """Move every quarantined file back. Returns (restored, problems)."""
    manifest = Path(manifest).expanduser()
    if manifest.is_dir():
        manifest = manifest / MANIFEST
    try:
        record = json.loads(manifest.read_text())
        moved = record["moved"]
        if not isinstance(moved, list) or not all(
                isinstance(m, dict) and isinstance(m.get("from"), str)
                and isinstance(m.get("to"), str) for m in moved):
            raise ValueError("its `moved` is not a list of {from, to} entries")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest}: not a doctor quarantine manifest ({e})",
                        "give the manifest that --quarantine or --apply-fixes wrote") from None
    restored, problems = 0, []
    for m in moved:
        src, dst = Path(m["to"]), Path(m["from"])
        if not src.exists():
            problems.append(f"{src}: missing, cannot restore {dst}")
        elif dst.exists():
            problems.append(f"{dst}: exists already, left {src} where it is")
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            restored += 1
    if not problems:
        manifest.rename(manifest.with_name(manifest.stem + ".undone.json"))
    return restored, problems
