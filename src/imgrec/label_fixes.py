"""What a user does with the label audit's findings, torch-free:

- `--fix-list FILE` writes the label issues as a CSV `path,given,suggested` to review and edit
  (blank the suggestion, or set it to the given label, to keep a file where it is);
- `imgrec doctor --apply-fixes FILE` moves each listed file from its given class folder to the
  suggested one (same split), after checking every row first, and writes a manifest that
  `imgrec doctor --undo MANIFEST` uses to put every file back (doctor.move_files / doctor.undo,
  as for --quarantine). Files are moved, never rewritten or deleted;
- `imgrec train ... --exclude FILE` leaves out the files a list names (a fix list, or one path
  per line) without moving anything.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import atomic_write_text
from .doctor import move_files
from .errors import DataError

FIELDS = ("path", "given", "suggested")
AUDIT_KINDS = ("label_issue", "near_duplicate", "outlier")


def write_fix_list(records: list[dict[str, Any]], data: str | Path, path: str | Path) -> Path:
    """The label issues as `path,given,suggested` rows, each path absolute (DATA's, then the
    file's within it), so the list applies from any folder. An image that is also an outlier
    is left out: it looks like no class (a rocket among cats and dogs), so no class should be
    suggested for it; the audit lists it as an outlier to remove or keep."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    strangers = {r["path"] for r in records if r["kind"] == "outlier"}
    for r in records:
        if r["kind"] == "label_issue" and r["path"] not in strangers:
            writer.writerow([str(Path(data).expanduser().resolve() / r["path"]), r["given"],
                             r["suggested"]])
    path = Path(path).expanduser()
    atomic_write_text(path, buf.getvalue())
    return path


def read_fix_list(path: str | Path) -> list[dict[str, str]]:
    """Rows of a fix list; a clear error for a missing file or a CSV without its columns."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: cannot read the fix list ({getattr(e, 'strerror', e)})",
            "give the CSV that `imgrec doctor DATA --labels --fix-list` wrote",
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    if not set(FIELDS) <= {(h or "").strip() for h in reader.fieldnames or []}:
        raise DataError(
            f"{path}: not a fix list (its header needs the columns {', '.join(FIELDS)})",
            "give the CSV that --fix-list wrote",
        )
    return [
        {k.strip(): (v or "").strip() for k, v in r.items() if isinstance(k, str)} for r in reader
    ]


def _source(raw: str, data: Path | None) -> Path:
    p = Path(raw).expanduser()
    if not p.is_absolute() and not p.exists() and data is not None and (data / p).exists():
        return data / p
    return p


def _plan_row(n: int, row: dict[str, str], data: Path | None) -> tuple[Path, Path] | None:
    """(from, to) for one row, or None when it keeps the file where it is."""
    given, suggested = row.get("given", ""), row.get("suggested", "")
    if not suggested or suggested == given:
        return None
    where = f"fix list row {n}"
    if not row.get("path"):
        raise DataError(f"{where}: no path")
    src = _source(row["path"], data)
    if not src.is_file():
        raise DataError(
            f"{where}: {row['path']}: no such file",
            "give DATA too when the paths are relative to it",
        )
    if src.parent.name != given:
        raise DataError(
            f"{where}: {src} is in the folder {src.parent.name!r}, not in its given "
            f"label's {given!r}",
            "the file moved since the audit: audit again",
        )
    if Path(suggested).name != suggested or suggested in (".", ".."):
        raise DataError(f"{where}: {suggested!r} is not a class folder name")
    folder = src.parent.parent / suggested
    if not folder.is_dir():
        raise DataError(
            f"{where}: there is no class folder {suggested!r} beside {given!r} ({folder})",
            "check the spelling; fixes move files between existing class folders",
        )
    return src, folder / src.name


def plan_fixes(
    rows: list[dict[str, str]], data: str | Path | None = None
) -> list[tuple[Path, Path, list[str]]]:
    """Every move the fix list asks for, all checked before any file moves: the file is
    where its given label says, the suggested class folder exists, nothing is overwritten."""
    root = Path(data).expanduser() if data else None
    moves, seen = [], set()
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        move = _plan_row(n, row, root)
        if move is None:
            continue
        src, dst = move
        if dst.exists() or dst.resolve() in seen or src.resolve() in seen:
            raise DataError(
                f"fix list row {n}: {dst} exists already or is listed twice",
                "rename one of the two files first",
            )
        seen.update((dst.resolve(), src.resolve()))
        moves.append((src, dst, [f"label fix: {row['given']} -> {row['suggested']}"]))
    return moves


def manifest_for(fix_list: Path) -> Path:
    return fix_list.with_name(fix_list.stem + ".applied.json")


def apply_fixes(fix_list: str | Path, data: str | Path | None = None) -> tuple[Path, int]:
    """Move the listed files to their suggested class folders; (manifest, files moved)."""
    fix_list = Path(fix_list).expanduser()
    manifest = manifest_for(fix_list)
    if manifest.exists():  # before the rows: once applied, their files are elsewhere
        raise DataError(
            f"{manifest} exists: this fix list was applied already",
            f"undo it first (imgrec doctor --undo {manifest})",
        )
    moves = plan_fixes(read_fix_list(fix_list), data)
    root = Path(data).expanduser() if data else _common_root([m[0] for m in moves])
    return move_files(moves, root.resolve(), manifest), len(moves)


def _common_root(paths: list[Path]) -> Path:
    import os

    if not paths:
        return Path.cwd()
    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


# -- imgrec train --exclude ----------------------------------------------------------------
def read_path_list(path: str | Path, option: str = "--exclude") -> list[str]:
    """The paths a list names: a CSV's `path` column (a fix list), else the first field of
    each line; blank lines and lines starting with # are skipped. `option`: the flag that
    named the file, for the error."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{option} {path}: cannot read it ({getattr(e, 'strerror', e)})",
            "give a CSV with a path column or a text file of paths",
        ) from None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    rows = list(csv.reader(lines))
    column = 0
    if rows and "path" in [c.strip() for c in rows[0]]:
        column = [c.strip() for c in rows[0]].index("path")
        rows = rows[1:]
    return [r[column].strip() for r in rows if len(r) > column and r[column].strip()]


def excluded_set(listed: list[str], data: str | Path | None) -> set[Path]:
    """Resolved absolute paths a listed entry may mean: as given (absolute, or from the
    current folder) and relative to DATA."""
    out: set[Path] = set()
    root = Path(data).expanduser() if data else None
    for entry in listed:
        p = Path(entry).expanduser()
        out.add(p.resolve())
        if root is not None and not p.is_absolute():
            out.add((root / p).resolve())
    return out


def flagged_set(list_file: str | Path, data: str | Path | None) -> set[Path]:
    """The files a list flags, as resolved paths: doctor's --json findings (the label audit's
    label_issue, near_duplicate and outlier entries, relative to the audited folder), a fix
    list or one path per line (relative to DATA or absolute)."""
    path = Path(list_file).expanduser()
    if path.suffix.lower() != ".json":
        return excluded_set(read_path_list(path, "--flagged"), data)
    try:
        findings = json.loads(path.read_text())
        root = Path(findings["data"])
        issues = [i for i in findings["issues"] if i.get("kind") in AUDIT_KINDS]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: not the findings of imgrec doctor --labels --json ({e})",
            "give doctor's --json file, a fix list or a list of paths",
        ) from None
    return {(root / i["path"]).resolve() for i in issues}


def exclude_files(ds: Any, list_file: str | Path, quiet: bool = False) -> Any:
    """A file dataset (data.datasets.Dataset) without the files the list names, in every
    split; says on stderr how many were left out."""
    if ds.in_memory:
        raise DataError(
            "--exclude names image files, but this dataset is held in memory",
            "use --exclude with a folder or a CSV of image paths",
        )
    listed = read_path_list(list_file)
    root = Path(ds.source).expanduser() if ds.source else None
    drop = excluded_set(listed, root if root is None or root.is_dir() else root.parent)
    removed = 0
    for name, split in list(ds.splits.items()):
        keep = [i for i, p in enumerate(split.paths) if Path(p).resolve() not in drop]
        removed += len(split) - len(keep)
        ds.splits[name] = split.subset(np.array(keep, dtype=np.int64))
        if not keep and name != "train":
            del ds.splits[name]
    taught = set(ds.splits["train"].labels.tolist()) if "train" in ds.splits else set()
    empty = [c for i, c in enumerate(ds.classes) if i not in taught]
    if empty:  # as a class folder with no training image is refused
        raise DataError(f"--exclude {list_file} leaves class(es) "
                        f"{', '.join(repr(c) for c in empty)} without a training image",
                        "exclude fewer files, or remove the class from the data")
    note = f"excluded {removed} file(s) listed in {list_file} ({len(listed)} listed)"
    ds.notes.append(note)
    if not quiet:
        print(note, file=sys.stderr, flush=True)
    return ds
