"""Cached pooled features of a frozen backbone (TF-Hub retrain.py's "bottlenecks", kept).

Every image's feature vector is computed once and stored under $IMGREC_CACHE (default
~/.cache/imgrec/features) in a folder per *extractor* — backbone name, weights identity and
preprocessing contract — and a file per *view* — the image's content hash, plus the view index,
augmentation spec and seed for augmented views. So a second run, another head, or new files
added to a class reuse everything already computed; changed pixels or preprocessing recompute.
Entries are safetensors (never pickle) carrying the checksum of their own values: a damaged
entry is detected, deleted and recomputed, never trusted.

Extraction runs the backbone through ONNX Runtime on the CPU (several times faster than eager
PyTorch there; the export is cached too) or PyTorch on a GPU, and decodes the next batch of
images in parallel threads while the current one runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract import Preprocess, load_input
from ..errors import InputError, ModelError
from ..models.pretrained import Backbone
from ..predict import OnnxEngine

CACHE_FORMAT = 1
BATCH = 32


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
        """Write atomically (a crash or a concurrent run never leaves half an entry)."""
        from safetensors.numpy import save

        vec = np.ascontiguousarray(vec, dtype=np.float32)
        meta = {"key": k, "sha256": hashlib.sha256(vec.tobytes()).hexdigest(),
                "format": str(CACHE_FORMAT)}
        path = self.path(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(save({"features": vec}, metadata=meta))
        os.replace(tmp, path)


# -- engines -------------------------------------------------------------------------------
class TorchFeatures:
    """The same network in PyTorch: the GPU engine, and the fallback when export fails."""

    name = "torch"

    def __init__(self, model, device):
        import torch

        self.torch, self.device = torch, device
        self.model = model.eval().to(device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


@dataclass
class Extractor:
    """Images -> pooled features for one backbone, through the cache."""

    backbone: Backbone
    device: object = None
    quiet: bool = False
    stats: dict = field(default_factory=lambda: {"cached": 0, "computed": 0, "corrupted": 0})

    def __post_init__(self) -> None:
        self.contract = self.backbone.contract
        self.key = extractor_key(self.backbone.name, self.backbone.identity, self.contract)
        self._engine = None
        self._model = None
        self.dim = self._feature_dim()
        self.cache = FeatureCache(self.key, self.dim)

    # -- the network ---------------------------------------------------------------------
    def model(self):
        if self._model is None:
            self._model = self.backbone.build(num_classes=0)
        return self._model

    def _feature_dim(self) -> int:
        meta = cache_root() / self.key / "extractor.json"
        if meta.is_file():
            try:
                return int(json.loads(meta.read_text())["dim"])
            except (ValueError, KeyError, OSError):
                pass
        from ..bundle import atomic_write_text

        dim = int(self.model().num_features)
        record = {"backbone": self.backbone.name, "weights": self.backbone.identity, "dim": dim,
                  "preprocess": self.contract.to_dict()}
        atomic_write_text(meta, json.dumps(record, indent=2) + "\n")
        return dim

    def engine(self) -> Callable[[np.ndarray], np.ndarray]:
        """ONNX Runtime on the CPU, PyTorch on a GPU."""
        if self._engine is not None:
            return self._engine
        import torch

        dev = torch.device(self.device or "cpu")
        if dev.type != "cpu":
            self._engine = TorchFeatures(self.model(), dev)
            return self._engine
        onnx_path = cache_root() / self.key / "extractor.onnx"
        if not onnx_path.is_file():
            from ..export import export_onnx

            size = self.contract.input_size
            try:
                export_onnx(self.model(), onnx_path, (3, size, size))
            except ModelError as e:
                print(f"note: {e}; extracting with PyTorch instead", file=sys.stderr)
                self._engine = TorchFeatures(self.model(), dev)
                return self._engine
        try:
            self._engine = OnnxEngine(path=onnx_path)
        except Exception:  # a damaged cached export: rebuild it once
            onnx_path.unlink(missing_ok=True)
            return self.engine()
        return self._engine

    # -- extraction ----------------------------------------------------------------------
    def features(self, paths: list[str], views: int = 0, augment: str = "none", seed: int = 0,
                 desc: str = "features") -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """Features of each path's original and `views` augmented views:
        (float32 N x (1 + views) x D, bool mask of readable files, {path: reason} skipped)."""
        from tqdm import tqdm

        n, v_total = len(paths), 1 + views
        out = np.zeros((n, v_total, self.dim), np.float32)
        good = np.ones(n, bool)
        have = np.zeros((n, v_total), bool)
        skipped: dict[str, str] = {}
        digests = _digest_all(paths)
        todo: list[int] = []  # images with at least one view missing
        keys: list[list[str]] = []
        for i, d in enumerate(digests):
            if isinstance(d, Exception):
                good[i] = False
                skipped[paths[i]] = f"unreadable ({d})"
                keys.append([])
                continue
            ks = [view_key(d, v, augment, seed) for v in range(v_total)]
            keys.append(ks)
            missing = False
            for v, k in enumerate(ks):
                vec = self.cache.get(k)
                if vec is None:
                    missing = True
                else:
                    out[i, v], have[i, v] = vec, True
            if missing:
                todo.append(i)
        self.stats["cached"] += int(have.sum())
        if todo:
            aug = _augmenter(augment) if views else None
            engine = self.engine()
            bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False,
                       disable=self.quiet or None, dynamic_ncols=True)
            chunks = [todo[s : s + BATCH] for s in range(0, len(todo), BATCH)]
            with ThreadPoolExecutor(max_workers=1) as prefetch:
                pending = prefetch.submit(self._decode, paths, chunks[0]) if chunks else None
                for c, chunk in enumerate(chunks):
                    decoded = pending.result()
                    if c + 1 < len(chunks):
                        pending = prefetch.submit(self._decode, paths, chunks[c + 1])
                    self._run_chunk(engine, chunk, decoded, keys, out, have, good, skipped,
                                    aug, paths)
                    bar.update(len(chunk))
            bar.close()
        self.stats["corrupted"] = self.cache.corrupted
        return out, good, skipped

    def _decode(self, paths: list[str], chunk: list[int]) -> list:
        from ..predict import decode_many

        return decode_many(lambda p: load_input(p, self.contract, invert="no"),
                           [paths[i] for i in chunk])

    def _run_chunk(self, engine, chunk, decoded, keys, out, have, good, skipped, aug, paths):
        pixels, rows = [], []  # (image index, view) of each row of the batch
        for i, px in zip(chunk, decoded, strict=True):
            if isinstance(px, InputError):
                good[i] = False
                skipped[paths[i]] = px.message
                continue
            for v in np.flatnonzero(~have[i]).tolist():
                pixels.append(px if v == 0 else aug(px, keys[i][v]))
                rows.append((i, v))
        for s in range(0, len(rows), BATCH):
            batch = np.stack(pixels[s : s + BATCH])
            feats = engine(self.contract.normalize(batch))
            for (i, v), vec in zip(rows[s : s + BATCH], feats, strict=True):
                out[i, v] = vec
                self.cache.put(keys[i][v], vec)
        self.stats["computed"] += len(rows)


def _digest_all(paths: list[str]) -> list:
    """Content hashes in threads (hashlib releases the GIL); an OSError is the item's result."""

    def one(p):
        try:
            return content_digest(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def _augmenter(spec: str) -> Callable[[np.ndarray, str], np.ndarray]:
    """uint8 C x H x W -> an augmented uint8 copy, drawn from a seed derived from the view's
    cache key: the same view is the same picture whichever batch it lands in."""
    import torch

    from ..augment import Augment

    augment = Augment.parse(spec)

    def apply(px: np.ndarray, key: str) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(key[:15], 16))
            x = augment(torch.from_numpy(px)[None].float())
        return x[0].round().clamp(0, 255).to(torch.uint8).numpy()

    return apply
