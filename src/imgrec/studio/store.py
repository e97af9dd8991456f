"""Projects, classes and images on disk. Torch-free.

    DIR/<project>/data/<class>/<file>   the dataset (what `imgrec train DIR/<project>/data` reads)
    DIR/<project>/trash/<class>/<file>  deleted images, until the trash is emptied
    DIR/<project>/model/                the last good bundle (renamed into place by the trainer)
    DIR/.trash/<project>-<time>/        deleted projects

Every upload is decoded by the one safe decoder (`images.decode_image`) before it is kept,
written atomically (`bundle.atomic_write_bytes`) under its content hash, so the same photo
added twice is stored once.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import atomic_write_bytes
from ..data.folders import SPLIT_ALIASES
from ..errors import Conflict, ImgrecError, InputError, NotFound
from ..images import decode_image, sniff_format

#: a project or class name: letters, digits, space, `_`, `-`, `.`; no `..`; at most 100
NAME = re.compile(r"^\w[\w .\-]{0,99}$")
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif",
              "webp": ".webp"}


#: a name's length in UTF-8: a folder name has at most 255 bytes, and the trash adds a
#: time stamp to it (100 Japanese characters are 300 bytes: created, then never deleted)
MAX_NAME_BYTES = 150


def check_name(name: str, what: str = "name") -> str:
    """The name itself, or a 400 when it could escape its folder or is not a plain name."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name or \
            name != name.strip() or len(name.encode()) > MAX_NAME_BYTES:
        raise InputError(f"invalid {what} {name[:40]!r}" if isinstance(name, str) else
                         f"invalid {what}", "use letters, digits, spaces, '_', '-' or '.' "
                         f"(at most 100 characters and {MAX_NAME_BYTES} bytes in UTF-8, no "
                         "'..' or '/')")
    return name


@dataclass
class Added:
    added: int = 0
    duplicates: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    error: ImgrecError | None = None  # the first rejection, raised when nothing was kept


#: a zip upload: at most this many members, each at most MAX_MEMBER bytes once inflated
#: in a project's folder while it trains (the trainer writes it, with the run's options)
TRAINING_MARKER = "training.json"
#: in the studio's folder: the project whose model POST /v1/predict answers with
SERVED = ".served"
MAX_MEMBERS = 5000
MAX_MEMBER = 50 * 1024 * 1024


def expand_zips(uploads: list[tuple[str, bytes]], out: Added) -> Iterator[tuple[str, bytes]]:
    """The uploads, a zip replaced by its files (`archive.zip/member`); members past the
    limits, or an unreadable archive, are reported in `out.rejected`. Sizes are checked as
    the bytes inflate, not as the archive claims them."""
    for filename, data in uploads:
        if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip, or an empty one
            yield filename, data
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()
                           and not Path(m.filename).name.startswith(".")
                           and "__MACOSX" not in m.filename]  # Finder's resource forks
                if len(members) > MAX_MEMBERS:
                    raise InputError(f"over {MAX_MEMBERS} files in the archive")
                if not members:
                    raise InputError("it holds no files (hidden files and folders are skipped)")
                for m in members:
                    with archive.open(m) as f:
                        body = f.read(MAX_MEMBER + 1)
                    if len(body) > MAX_MEMBER:
                        _reject(out, f"{filename}/{m.filename}", "over 50 MB once unpacked")
                        continue
                    yield f"{filename}/{m.filename}", body
        except (zipfile.BadZipFile, InputError, OSError, RuntimeError) as e:
            why = e.message if isinstance(e, InputError) else f"unreadable zip ({e})"
            _reject(out, filename, why)


def _reject(out: Added, filename: str, why: str) -> None:
    """An upload not kept: listed, and the request's error when nothing else is kept."""
    out.rejected.append({"filename": filename, "error": why})
    out.error = out.error or InputError(f"{filename}: {why}",
                                        "upload photos, or a zip of photos")


class Store:
    """The studio's folder: one sub-folder per project."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- projects ----------------------------------------------------------------------------
    def project(self, name: str, must_exist: bool = True) -> Path:
        path = self.root / check_name(name, "project name")
        if must_exist and not (path / "data").is_dir():
            raise NotFound(f"no project {name!r}")
        return path

    def projects(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "data").is_dir())

    def create_project(self, name: str) -> Path:
        path = self.project(name, must_exist=False)
        if path.exists():
            raise Conflict(f"project {name!r} exists")
        (path / "data").mkdir(parents=True)
        return path

    def idle(self, name: str) -> Path:
        """The project's folder, when it is not training: deleting or renaming what a run is
        reading (a class, an image, the project) would give a model whose classes no longer
        match the project, so it is refused (409) until the run ends."""
        path = self.project(name)
        if (path / TRAINING_MARKER).exists():
            raise Conflict(f"project {name!r} is training; wait for it to end (GET its /train)")
        return path

    def delete_project(self, name: str) -> None:
        path = self.idle(name)
        trash = self.root / ".trash"
        trash.mkdir(exist_ok=True)
        path.rename(trash / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
        if self._serves(name):  # nothing is served any more
            (self.root / SERVED).unlink(missing_ok=True)

    def rename_project(self, name: str, new: str) -> None:
        path, target = self.idle(name), self.project(new, must_exist=False)
        if new == name:  # nothing to do (not a clash with itself)
            return
        if target.exists():
            raise Conflict(f"project {new!r} exists")
        path.rename(target)
        if self._serves(name):  # the served model follows it
            atomic_write_bytes(self.root / SERVED, new.encode())

    def _serves(self, name: str) -> bool:
        served = self.root / SERVED
        return served.is_file() and served.read_text() == name

    # -- classes -----------------------------------------------------------------------------
    def class_dir(self, project: str, name: str, must_exist: bool = True) -> Path:
        path = self.project(project) / "data" / check_name(name, "class name")
        if must_exist and not path.is_dir():
            raise NotFound(f"no class {name!r} in project {project!r}")
        if not must_exist and name.lower() in SPLIT_ALIASES:
            # a folder of that name makes the project's data a split layout (train/, test/...):
            # the run found no class folders, and said so about a project with three
            raise InputError(f"a class cannot be called {name!r}: imgrec reads a folder of that "
                             "name as a dataset split", "choose another name")
        return path

    def classes(self, project: str) -> dict[str, list[str]]:
        data = self.project(project) / "data"
        return {c.name: sorted(f.name for f in c.iterdir() if f.is_file()
                               and not f.name.startswith("."))
                for c in sorted(data.iterdir()) if c.is_dir() and not c.name.startswith(".")}

    def create_class(self, project: str, name: str) -> None:
        self.idle(project)  # a new, empty class folder failed the run reading the project
        path = self.class_dir(project, name, must_exist=False)
        if path.exists():
            raise Conflict(f"class {name!r} exists in project {project!r}")
        path.mkdir()

    def rename_class(self, project: str, name: str, new: str) -> None:
        self.idle(project)
        path, target = self.class_dir(project, name), self.class_dir(project, new, False)
        if new == name:  # nothing to do (not a clash with itself)
            return
        if target.exists():
            raise Conflict(f"class {new!r} exists in project {project!r}")
        path.rename(target)

    def delete_class(self, project: str, name: str) -> None:
        self.idle(project)
        path = self.class_dir(project, name)
        for f in path.iterdir():
            self._to_trash(project, name, f)
        path.rmdir()

    # -- images ------------------------------------------------------------------------------
    def add_images(self, project: str, cls: str, uploads: list[tuple[str, bytes]]) -> Added:
        """Keep each upload that decodes, named by its content hash; report the others."""
        folder, out = self.class_dir(project, cls), Added()
        for filename, data in expand_zips(uploads, out):
            try:
                decode_image(data, name=filename)
            except ImgrecError as e:
                out.rejected.append({"filename": filename, "error": e.message})
                out.error = out.error or e
                continue
            digest = hashlib.sha256(data).hexdigest()[:32]
            suffix = EXTENSIONS.get(str(sniff_format(data[:16])).lower(), "")
            path = folder / f"{digest}{suffix}"
            if path.exists():
                out.duplicates += 1
                continue
            atomic_write_bytes(path, data)
            out.added += 1
        return out

    def image(self, project: str, cls: str, filename: str) -> Path:
        path = self.class_dir(project, cls) / check_name(filename, "file name")
        if not path.is_file():
            raise NotFound(f"no image {filename!r} in class {cls!r}")
        return path

    def delete_image(self, project: str, cls: str, filename: str) -> None:
        self.idle(project)
        self._to_trash(project, cls, self.image(project, cls, filename))

    def empty_trash(self, project: str) -> None:
        shutil.rmtree(self.project(project) / "trash", ignore_errors=True)

    def _to_trash(self, project: str, cls: str, path: Path) -> None:
        target = self.project(project) / "trash" / cls / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
