"""The feature cache, torch-free: where a backbone's pooled features of an image are stored
and how they are keyed (extractor identity: backbone, weights identity, preprocessing
contract; view: the image's content hash, plus view index, augmentation and seed).

Training fills it (training/features.py); `evaluate` of a features-mode bundle reads it back
for images training already embedded (evaluation.py), which is why it lives outside
imgrec.training. Entries are safetensors (never pickle) carrying the checksum of their own
values: a damaged entry is detected, deleted and recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .contract import Preprocess
from .files import private_name

CACHE_FORMAT = 2  # 2: the contract resamples only the centre crop (pixels moved by rounding)


def cache_root() -> Path:
    """$IMGREC_CACHE, else ~/.cache/imgrec/features."""
    env = os.environ.get("IMGREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imgrec" / "features"


def extractor_key(backbone: str, weights: str, contract: Preprocess) -> str:
    """Identity of the function image -> features: any change makes a new cache folder."""
    spec = {"format": CACHE_FORMAT, "backbone": backbone, "weights": weights,
            "preprocess": contract.to_dict()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the key of its features (its name and date do not matter)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def view_key(digest: str, view: int = 0, augment: str = "none", seed: int = 0) -> str:
    """View 0 is the image itself; view k > 0 the k-th augmented copy under `augment` and
    `seed`, so changing either recomputes the views and keeps the originals."""
    if view == 0:
        return digest
    return hashlib.sha256(f"{digest}:view={view}:aug={augment}:seed={seed}".encode()).hexdigest()


class FeatureCache:
    """One folder of validated feature vectors for one extractor."""

    def __init__(self, key: str, dim: int, root: Path | None = None):
        self.key, self.dim = key, dim
        self.folder = (root or cache_root()) / key
        self.corrupted = 0
        self.unwritable: str | None = None  # why entries are no longer written (a full disk)

    def path(self, k: str) -> Path:
        return self.folder / k[:2] / f"{k}.safetensors"

    def get(self, k: str) -> np.ndarray | None:
        """The stored vector, or None when absent or failing validation (then deleted)."""
        path = self.path(k)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                vec = f.get_tensor("features")
            ok = (meta.get("key") == k and vec.dtype == np.float32 and vec.shape == (self.dim,)
                  and hashlib.sha256(vec.tobytes()).hexdigest() == meta.get("sha256")
                  and bool(np.isfinite(vec).all()))
        except Exception:
            ok = False
        if not ok:
            self.corrupted += 1
            path.unlink(missing_ok=True)
            return None
        return vec

    def put(self, k: str, vec: np.ndarray) -> None:
        """Write atomically (a crash or a concurrent run never leaves half an entry). The
        cache only saves time: when it cannot be written (a full disk, a read-only folder)
        the run goes on without it, and says so once."""
        if self.unwritable is not None:
            return
        from safetensors.numpy import save

        vec = np.ascontiguousarray(vec, dtype=np.float32)
        meta = {"key": k, "sha256": hashlib.sha256(vec.tobytes()).hexdigest(),
                "format": str(CACHE_FORMAT)}
        path = self.path(k)
        tmp = private_name(path, "tmp")  # (studio trains projects in threads of one process)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(save({"features": vec}, metadata=meta))
            os.replace(tmp, path)
        except OSError as e:
            self.unwritable = f"{self.folder}: {e.strerror or e}"
            print(f"note: cannot write the feature cache ({self.unwritable}); going on without "
                  "it (set $IMGREC_CACHE to a folder with space)", file=sys.stderr)
        finally:
            with contextlib.suppress(OSError):  # gone, or its folder never made
                tmp.unlink()


def digest_all(paths: list[str]) -> list:
    """Content hashes in threads (hashlib releases the GIL); an OSError is the item's result."""

    def one(p):
        try:
            return content_digest(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))
