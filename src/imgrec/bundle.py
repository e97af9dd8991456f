"""The model bundle: a directory that everything downstream of training reads.

    model.safetensors   weights (never pickle: loading a bundle runs no code)
    imgrec.json         format version, architecture, classes, preprocessing contract, summary
    model.onnx          optional, written by `imgrec export`; serving prefers it
    history.csv, curves.png, events.*   the training record

Torch-free (the serve path uses it): writing and loading the network's weights is
`imgrec.network`'s job.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .contract import Preprocess
from .errors import BundleError

FORMAT = "imgrec-bundle"
FORMAT_VERSION = 1
META_FILE = "imgrec.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"


@dataclass
class Bundle:
    """A bundle's metadata, and where it lives."""

    path: Path
    architecture: dict[str, Any]
    classes: list[str]
    preprocess: Preprocess
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.extra.get("display_name") or self.path.name

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.extra.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
            "architecture": self.architecture,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "temperature": self.temperature,
            "training": self.training,
            "metrics": self.metrics,
            **{k: v for k, v in self.extra.items() if k != "created"},
        }

    def write_meta(self) -> None:
        """Write imgrec.json atomically (a crash never leaves half a file)."""
        atomic_write_text(self.path / META_FILE, json.dumps(self.to_json(), indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bundle(path: str | Path, need_weights: bool = True) -> Bundle:
    """Read and validate a bundle's metadata. Torch-free."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle", "give a folder written by `imgrec train`")
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a folder, this is a file")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(
            f"{path}: not an imgrec bundle ({META_FILE} is missing)",
            "give a folder written by `imgrec train`",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{meta_path}: unreadable ({e})",
                          "retrain or restore the bundle") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not an imgrec bundle description")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is newer than this imgrec reads "
            f"({FORMAT_VERSION})",
            "upgrade imgrec (pip install -U imgrec)",
        )
    has_weights = (path / WEIGHTS_FILE).is_file()
    has_onnx = (path / ONNX_FILE).is_file()
    if need_weights and not has_weights:
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing", "retrain or restore the bundle")
    if not has_weights and not has_onnx:
        raise BundleError(f"{path}: neither {WEIGHTS_FILE} nor {ONNX_FILE} is there")
    try:
        classes = [str(c) for c in meta["classes"]]
        bundle = Bundle(
            path=path,
            architecture=dict(meta["architecture"]),
            classes=classes,
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            training=meta.get("training") or {},
            metrics=meta.get("metrics") or {},
            temperature=float(meta.get("temperature") or 1.0),
            extra={
                k: v
                for k, v in meta.items()
                if k
                not in {"format", "format_version", "architecture", "classes", "preprocess",
                        "training", "metrics", "temperature"}
            },
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{meta_path}: incomplete bundle description ({e})") from None
    if not classes:
        raise BundleError(f"{meta_path}: the bundle lists no classes")
    return bundle


#: imgrec.json key recording what `imgrec export` wrote and which file serving runs.
EXPORT_KEY = "export"


def serving_onnx_path(bundle: Bundle) -> Path:
    """The ONNX file that serving runs: the one `imgrec export` recorded in imgrec.json
    ("export": {"serve": FILE}) when it is there and not older than model.onnx (a re-export
    or retraining makes an old int8 file stale), else model.onnx. Torch-free."""
    fp32 = Path(bundle.onnx_path)
    name = (bundle.extra.get(EXPORT_KEY) or {}).get("serve")
    if isinstance(name, str) and name and Path(name).name == name and name != fp32.name:
        chosen = Path(bundle.path) / name
        if chosen.is_file() and (not fp32.is_file()
                                 or chosen.stat().st_mtime >= fp32.stat().st_mtime):
            return chosen
    return fp32
