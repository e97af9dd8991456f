"""Where imgrec writes: outputs checked before any work starts, a lock so two runs never
write one folder, and a failed run leaving nothing it created behind. (Each file itself is
written atomically by bundle.atomic_write_bytes / atomic_write_text.) Torch-free.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ImgrecError

LOCK_FILE = ".imgrec.lock"


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and delete a file in `folder`: the only test that holds everywhere (root
    passes os.access on read-only mounts and /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".imgrec-probe-"):
            pass
    except OSError as e:
        raise ImgrecError(f"{option} {path}: cannot write there ({e.strerror or e})",
                          "choose a folder you can write to") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """A folder imgrec will create or fill: not a file, and writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ImgrecError(f"{option} {path} is a file, not a folder",
                          f"give {option} a folder (new or existing)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ImgrecError(f"{option} {path}: {base} is a file, not a folder")
    _probe(base, option, path)
    return path


#: files that make a folder a training run's own (a bundle, or an interrupted run's checkpoint)
RUN_MARKERS = ("imgrec.json", "checkpoint.pt")


def private_name(path: Path, tag: str) -> Path:
    """A hidden name beside `path` that no other process or thread writes at the same time
    (two trainings sharing $IMGREC_CACHE, or two exports of one bundle, used fixed temporary
    names and crashed on each other's renames)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock now ("pid N on HOST": a training or export writing it), or
    None. Readers ask when what they read does not add up: a bundle being replaced."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return None
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def being_written(folder: str | Path) -> ImgrecError | None:
    """The error to give instead of "damaged" when a run is writing the bundle right now."""
    holder = lock_holder(folder)
    if holder is None:
        return None
    return ImgrecError(f"{folder}: an imgrec run ({holder}) is writing this bundle right now",
                       "retry when it has finished")


def check_run_folder(path: str | Path, option: str = "--out") -> Path:
    """A training run's output folder: new, empty, or a run's own (a bundle to replace, an
    interrupted run to resume). A folder of other files is refused before anything is
    written: the bundle's config.json, history.csv... would overwrite the user's."""
    path = check_output_folder(path, option)
    if not path.is_dir() or any((path / name).exists() for name in RUN_MARKERS):
        return path
    others = sorted(p.name for p in path.iterdir()
                    if not p.name.startswith((".", "events.out.tfevents")))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                         else "")
        raise ImgrecError(f"{option} {path} is not empty and not an imgrec bundle ({shown})",
                          f"give {option} a new or empty folder: training writes the bundle "
                          "(imgrec.json, config.json, history.csv...) there")
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """A file imgrec will write at the end of a command: checked before the work starts."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ImgrecError(f"{option} {path} is a folder", f"give {option} a file name")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ImgrecError(f"{option} {path}: {base} is a file, not a folder")
    _probe(base, option, path)
    return path


class FolderLock:
    """An exclusive lock on an output folder (flock on LOCK_FILE: the kernel drops it when
    the holder dies, so a killed run's lock never sticks). The file names the holder."""

    def __init__(self, folder: Path, option: str = "--out"):
        self.path, self.option, self.fd = Path(folder) / LOCK_FILE, option, None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the run goes ahead
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ImgrecError(f"{self.option} {self.path.parent} is in use by another imgrec "
                              f"run ({holder})",
                              f"wait for it to finish, or choose another {self.option}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


#: the output folders this process created for runs still writing them (output_folder)
_CREATED: set[Path] = set()


def remove_unfinished() -> None:
    """Remove the output folders this process created whose run holds no work yet: for an
    exit that skips output_folder's own cleanup (a distributed rank stopped by a signal leaves
    with os._exit, and left its lock and events file in a new --out)."""
    for path in list(_CREATED):
        if not holds_work(path):
            shutil.rmtree(path, ignore_errors=True)


def holds_work(path: Path) -> bool:
    """Whether a run's folder holds a model or a checkpoint (RUN_MARKERS): work to keep."""
    return any((path / name).is_file() for name in RUN_MARKERS)


@contextmanager
def output_folder(path: str | Path, option: str = "--out") -> Iterator[Path]:
    """Create (or reuse) a run's output folder and lock it while the run writes. When the
    run fails and the folder was new, it is removed again (a failed run leaves nothing),
    unless it holds work: a model or a checkpoint (Ctrl-C while the finished model was
    scored or exported, a full disk after some epochs) is never thrown away."""
    path = check_output_folder(path, option)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImgrecError(f"{option} {path}: cannot create the folder ({e.strerror or e})",
                          "choose a folder you can write to") from None
    lock = FolderLock(path, option).acquire()
    if created:
        _CREATED.add(path)
    try:
        yield path
    except BaseException:
        _CREATED.discard(path)
        lock.release()
        if created and not holds_work(path):
            shutil.rmtree(path, ignore_errors=True)
        elif created:
            print(f"imgrec: kept {path}: it holds the model or checkpoint written before the "
                  "run stopped (--resume continues a checkpoint)", file=sys.stderr)
        raise
    _CREATED.discard(path)
    lock.release()
