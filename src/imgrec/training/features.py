"""Cached pooled features of a frozen backbone (TF-Hub retrain.py's "bottlenecks", kept).

Every image's feature vector is computed once and stored under $IMGREC_CACHE (default
~/.cache/imgrec/features) in a folder per *extractor* — backbone name, weights identity and
preprocessing contract — and a file per *view* — the image's content hash, plus the view index,
augmentation spec and seed for augmented views. So a second run, another head, or new files
added to a class reuse everything already computed; changed pixels or preprocessing recompute.
Entries are safetensors (never pickle) carrying the checksum of their own values: a damaged
entry is detected, deleted and recomputed, never trusted.

Extraction runs the backbone through ONNX Runtime on the CPU (several times faster than eager
PyTorch there; the export is cached too) or PyTorch on a GPU. On the CPU it runs in lanes: one
single-threaded session per core, each decoding and embedding its own batches.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..contract import load_input
from ..errors import InputError, ModelError
from ..feature_cache import (  # noqa: F401 (the cache's names, as training has always used them)
    CACHE_FORMAT,
    FeatureCache,
    cache_root,
    content_digest,
    digest_all,
    extractor_key,
    view_key,
)
from ..models.pretrained import Backbone
from ..predict import OnnxEngine, available_cores, in_lanes, lane_count

BATCH = 32


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
    #: images computed and the seconds it took (decoding and inference, not the export)
    timing: dict = field(default_factory=lambda: {"images": 0, "seconds": 0.0})

    def __post_init__(self) -> None:
        self.contract = self.backbone.contract
        self.key = extractor_key(self.backbone.name, self.backbone.identity, self.contract)
        self._engine = None
        self._model = None
        self.dim = self._feature_dim()
        self.cache = FeatureCache(self.key, self.dim)
        self._lanes: list | None = None

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
            except InputError as e:  # the cache folder cannot be written: full, read-only
                print(f"note: the feature cache cannot hold the extractor ({e.message}); "
                      "extracting with PyTorch instead (set $IMGREC_CACHE to a folder with "
                      "space)", file=sys.stderr)
                self._engine = TorchFeatures(self.model(), dev)
                return self._engine
        try:
            self._engine = OnnxEngine(path=onnx_path, threads=lane_count(_cores()))
        except Exception:  # a damaged cached export: rebuild it once
            onnx_path.unlink(missing_ok=True)
            return self.engine()
        return self._engine

    # -- extraction ----------------------------------------------------------------------
    def features(self, paths: list[str], views: int = 0, augment: str = "none", seed: int = 0,
                 desc: str = "features", progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """Features of each path's original and `views` augmented views:
        (float32 N x (1 + views) x D, bool mask of readable files, {path: reason} skipped).
        `progress(done, len(paths))` hears how many images are done (cached ones at once)."""
        n, v_total = len(paths), 1 + views
        out = np.zeros((n, v_total, self.dim), np.float32)
        good = np.ones(n, bool)
        have = np.zeros((n, v_total), bool)
        skipped: dict[str, str] = {}
        keys: list[list[str]] = []
        for i, d in enumerate(digest_all(paths)):
            if isinstance(d, Exception):
                good[i] = False
                skipped[paths[i]] = f"unreadable ({d})"
                keys.append([])
                continue
            keys.append([view_key(d, v, augment, seed) for v in range(v_total)])
            for v, k in enumerate(keys[-1]):
                vec = self.cache.get(k)
                if vec is not None:
                    out[i, v], have[i, v] = vec, True
        self.stats["cached"] += int(have.sum())
        todo = [i for i in range(n) if good[i] and not have[i].all()]
        ready = n - len(todo)
        if progress is not None:
            progress(ready, n)
        if todo:
            self._compute(todo, paths, keys, out, have, good, skipped,
                          _augmenter(augment) if views else None, desc,
                          None if progress is None else lambda k: progress(ready + k, n))
        self.stats["corrupted"] = self.cache.corrupted
        return out, good, skipped

    def lanes(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        """The engines that run side by side (`predict.in_lanes`): on the CPU one
        single-threaded ONNX Runtime session per core; a GPU (or PyTorch) engine is one lane."""
        engine = self.engine()
        lanes = lane_count(_cores())
        if not isinstance(engine, OnnxEngine) or lanes == 1:
            return [engine]
        if self._lanes is None:
            self._lanes = [OnnxEngine(path=engine.path, threads=1) for _ in range(lanes)]
        return self._lanes

    def _compute(self, todo, paths, keys, out, have, good, skipped, aug, desc,
                 done: Callable[[int], None] | None = None) -> None:
        """The missing views of `todo`, a batch per lane at a time (each lane decodes its
        batch, then runs it); results are stored in order by this thread, which tells
        `done(images so far)` after each batch."""
        import time

        from tqdm import tqdm

        def embed(engine, chunk: list[int]):
            return self._embed_chunk(engine, chunk, keys, have, aug, paths)

        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False,
                   disable=self.quiet or None, dynamic_ncols=True)
        # about BATCH embeddings a chunk, views included: with 16 augmented views a chunk of
        # 32 photos was 544 of them, and the progress (a chunk at a time) sat still for long
        step = max(1, BATCH // have.shape[1])
        chunks = [todo[s : s + step] for s in range(0, len(todo), step)]
        results, finished = in_lanes(self.lanes(), embed, chunks), 0
        for chunk, (bad, rows, feats) in zip(chunks, results, strict=True):
            for i, message in bad:
                good[i] = False
                skipped[paths[i]] = message
            for (i, v), vec in zip(rows, feats, strict=True):
                out[i, v] = vec
                self.cache.put(keys[i][v], vec)
            self.stats["computed"] += len(rows)
            bar.update(len(chunk))
            finished += len(chunk)
            if done is not None:
                done(finished)
        bar.close()
        self.timing["images"] += len(todo)
        self.timing["seconds"] += time.perf_counter() - t0

    def _embed_chunk(self, engine, chunk, keys, have, aug, paths):
        """Decode one batch of images and embed their missing views: (unreadable (index,
        reason) pairs, (index, view) rows, features)."""
        pixels, rows, bad = [], [], []
        for i in chunk:
            try:
                px = load_input(paths[i], self.contract, invert="no")
            except InputError as e:
                bad.append((i, e.message))
                continue
            for v in np.flatnonzero(~have[i]).tolist():
                pixels.append(px if v == 0 else aug(px, keys[i][v]))
                rows.append((i, v))
        feats = [engine(self.contract.normalize(np.stack(pixels[s : s + BATCH])))
                 for s in range(0, len(rows), BATCH)]
        return bad, rows, (np.concatenate(feats) if feats else np.zeros((0, self.dim)))


def _cores() -> int:
    """This process's share of the cores: all of them, or 1 / LOCAL_WORLD_SIZE of them in
    each of torchrun's processes on a machine."""
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


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
