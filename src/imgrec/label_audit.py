"""The label audit (`imgrec doctor DATA --labels`, `imgrec.audit(DATA)`): whole, valid images
that are wrong for the dataset — a dog filed under cat, the same photo in train and
validation after a resize, a screenshot among photos.

1. Every image is embedded once by a pretrained backbone through the transfer feature cache
   (training/features.py: the same extractor key, ONNX Runtime lanes and cache entries as
   `imgrec train --mode features`, so each reuses what the other computed).
2. Out-of-sample class probabilities: k-fold cross-validation of a logistic-regression head on
   the standardised embeddings; no image is scored by a head that saw it.
3. Label issues: cleanlab's `find_label_issues`, ranked by self-confidence; each with the given
   label, the suggested (most probable) one and a score, 1 - p(given label).
4. Near duplicates: pairs whose embeddings' cosine similarity reaches a threshold; a leak when
   the pair crosses train/validation/test.
5. Outliers: how far an image's nearest neighbours are (1 - mean cosine similarity of the
   k nearest), as a robust z-score against the whole dataset (median, MAD).
6. Per-class label quality: images, issues given that label, issues suggesting it, and the
   mean out-of-sample probability of the given label.

Nothing here moves or rewrites a file; `label_fixes.py` applies a reviewed fix list.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .doctor import is_imageish, list_files
from .errors import DataError, ImgrecError, ModelError

DEFAULT_BACKBONE = "efficientnet_lite0"
#: k of the k-fold cross-validation (fewer when a class has fewer images)
FOLDS = 5
#: inverse regularisation of the logistic-regression head on standardised embeddings
#: (cats-dogs-mini: 98.7% cross-validated accuracy at 0.01, 97.2% at 1)
HEAD_C = 0.01
#: cleanlab's filter. On cats-dogs-mini with 5% of the training labels flipped (8 seeds),
#: "predicted_neq_given" flagged 98% of the flipped files and 1.3% of the clean set;
#: cleanlab's default "prune_by_noise_rate" under-estimated the count and flagged 92%.
FILTER_BY = "predicted_neq_given"
#: cosine similarity of two embeddings at or over which they count as near duplicates (the
#: mini set's one same-photo pair: 0.976; its next most similar pair of photos: 0.84)
NEAR_SIMILARITY = 0.92
#: a resize and a JPEG re-encode blur the embedding (a photo at 80%, quality 60: 0.87), so an
#: image's most similar other image at or over CANDIDATE_SIMILARITY is compared pixel by pixel
#: too: 32 x 32 grey thumbnails correlating at or over PIXEL_CORRELATION are the same picture
#: (that copy: 1.000; the mini set's look-alike pairs of different photos: at most 0.56)
CANDIDATE_SIMILARITY = 0.75
PIXEL_CORRELATION = 0.9
#: neighbours averaged for the outlier distance, and the robust z-score flagged as an outlier
#: (the clean mini set's largest: 2.8; a terminal screenshot and a plot among it: 4.1, 4.0)
NEIGHBOURS = 5
OUTLIER_Z = 3.5
KINDS = ("label_issue", "near_duplicate", "outlier")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class LabelAudit:
    """What the audit found: `records` (dicts: kind, path relative to `root`, ...), each kind
    sorted by score (most suspicious first), and the per-class summary."""

    root: Path
    layout: str
    classes: list[str]
    model: str
    images: int
    records: list[dict[str, Any]]
    class_quality: list[dict[str, Any]]
    cv_accuracy: float
    folds: int
    skipped: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def flagged(self, kind: str = "label_issue") -> list[str]:
        """Relative paths of the files with a record of `kind`, most suspicious first."""
        return list(dict.fromkeys(r["path"] for r in self.of(kind)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "model": self.model,
            "images": self.images,
            "classes": self.classes,
            "folds": self.folds,
            "cv_accuracy": round(self.cv_accuracy, 4),
            "class_quality": self.class_quality,
            "counts": {k: len(self.of(k)) for k in KINDS},
            "records": self.records,
            "skipped": self.skipped,
            "seconds": self.timing,
            "feature_cache": self.cache,
        }

    def doctor_issues(self) -> list[dict[str, Any]]:
        """The records as entries of doctor's JSON `issues` (each with its `detail` line)."""

        def detail(r: dict[str, Any]) -> str:
            if r["kind"] == "label_issue":
                return (
                    f"labelled {r['given']} but looks like {r['suggested']} "
                    f"(out-of-sample p({r['given']}) = {r['p_given']:.3f})"
                )
            if r["kind"] == "near_duplicate":
                return (
                    f"{'leak: ' if r['leak'] else ''}looks like {r['other']} "
                    f"({r['other_split']}/{r['other_given']}; embedding similarity "
                    f"{r['similarity']:.3f}, pixel correlation {r['pixel_correlation']:.3f})"
                )
            return f"far from every other image (robust z {r['score']:.1f}; nearest {r['nearest']})"

        return [{**r, "detail": detail(r)} for r in self.records]

    def text(self, top: int = 20) -> str:
        from .label_report import audit_text

        return audit_text(self, top)


# -- the pieces ----------------------------------------------------------------------------
@dataclass
class _Samples:
    rel: list[str]
    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    classes: list[str]
    layout: str
    root: Path


def _samples(root: Path) -> _Samples:
    """The labelled images of a folder dataset, as doctor lists them (class folders, with or
    without train/validation/test)."""
    if not root.is_dir():
        raise DataError(
            f"{root}: not a folder",
            "the label audit reads a folder dataset (DIR/<class>/*.jpg or DIR/train/<class>/*.jpg)",
        )
    layout, files = list_files(root)
    files = [f for f in files if f.label is not None and is_imageish(f.path)]
    classes = sorted({f.label for f in files})
    if len(classes) < 2:
        raise DataError(
            f"{root}: found {len(classes)} class folder(s) with images; the label "
            "audit needs at least two",
            "lay it out as DIR/<class>/*.jpg",
        )
    index = {c: i for i, c in enumerate(classes)}
    return _Samples(
        [f.rel for f in files],
        [str(f.path) for f in files],
        [f.split or "train" for f in files],
        np.array([index[f.label] for f in files], np.int64),
        classes,
        layout,
        root,
    )


def audit_backbone(model: str | Path | None):
    """MODEL: a bundle folder (its network's pooled features), `imagenet` or an offline
    EfficientNet-Lite name, or a timm name with pretrained weights (timm's hub or its cache)."""
    import dataclasses

    from .models.pretrained import resolve_backbone as resolve
    from .zoo import PRETRAINED

    name = str(model or DEFAULT_BACKBONE)
    path = Path(name).expanduser()
    if path.is_dir():
        from .bundle import read_bundle

        bundle = read_bundle(path)
        arch = bundle.architecture.get("name", "")
        arch = (
            bundle.architecture.get("args", {}).get("backbone", arch)
            if arch == "transfer"
            else arch
        )
        _check_pretrained(name, arch)
        backbone = resolve(
            arch, weights=bundle.weights_path, image_size=bundle.preprocess.input_size
        )
        return dataclasses.replace(backbone, contract=bundle.preprocess.replace(tta=()))
    if "/" in name or name.startswith("."):
        raise ModelError(
            f"--model {name}: no such bundle folder",
            "give a bundle folder, `imagenet` or a timm model name",
        )
    return resolve(PRETRAINED.get(name.lower(), name), pretrained=True)


def _check_pretrained(model: str, arch: str) -> None:
    """The audit embeds with an ImageNet backbone's pooled features: a bundle trained from
    scratch (small-cnn on MNIST) has none, nor a network built in Python."""
    from .models.registry import model_config

    try:
        scratch = model_config(arch).weights == "scratch"
    except ImgrecError:  # not in the registry nor timm's: a network built in Python
        scratch = True
    if scratch:
        raise ModelError(
            f"--model {model}: its network ({arch or 'unknown'}) was trained from scratch; the "
            "label audit embeds images with a pretrained backbone",
            "give `imagenet`, an EfficientNet-Lite or timm name, or a bundle trained with "
            "--mode features or finetune",
        )


@dataclass
class _Embedded:
    x: np.ndarray  # N x D
    good: np.ndarray  # bool N
    skipped: dict[str, str]
    backbone: str
    stats: dict[str, int]


def _memo_path() -> Path:
    from .feature_cache import cache_root

    return cache_root() / "audit-extractors.json"


def _memo_key(model: str | Path | None) -> str:
    from .zoo import PRETRAINED

    name = str(model or DEFAULT_BACKBONE)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else PRETRAINED.get(name.lower(), name)


def _stat(path: str | Path) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _from_memo(samples: _Samples, model: str | Path | None) -> _Embedded | None:
    """Every embedding straight from the feature cache, torch-free, when an earlier audit
    recorded this MODEL's extractor key and its weights file is unchanged (size, mtime);
    None when anything is missing (then the extractor computes it)."""
    import json

    from ._version import __version__
    from .feature_cache import CACHE_FORMAT, FeatureCache, digest_all, view_key

    try:
        entry = json.loads(_memo_path().read_text())[_memo_key(model)]
        if (
            entry["stamp"] != [CACHE_FORMAT, __version__]
            or _stat(entry["weights"]) != entry["weights_stat"]
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cache = FeatureCache(entry["key"], int(entry["dim"]))
    undecodable = entry.get("undecodable", {})
    x = np.zeros((len(samples.paths), cache.dim), np.float32)
    good, skipped = np.ones(len(x), bool), {}
    for i, (path, digest) in enumerate(zip(samples.paths, digest_all(samples.paths), strict=True)):
        vec = None if isinstance(digest, Exception) else cache.get(view_key(digest))
        if vec is None and not isinstance(digest, Exception) and digest in undecodable:
            good[i], skipped[path] = False, f"{path}: {undecodable[digest]}"
        elif vec is None:
            return None
        else:
            x[i] = vec
    stats = {"cached": int(good.sum()), "computed": 0, "corrupted": 0}
    return _Embedded(x, good, skipped, entry["backbone"], stats)


def _undecodable(skipped: dict[str, str], known: dict[str, str]) -> dict[str, str]:
    """{content digest: reason} of the files the extractor could not decode (so that a warm
    audit knows them without decoding them again), added to those already known."""
    from .feature_cache import content_digest

    out = dict(known)
    for path, reason in skipped.items():
        try:
            out[content_digest(path)] = reason.removeprefix(f"{path}: ")
        except OSError:
            continue
    return dict(list(out.items())[-10000:])


def _remember(model: str | Path | None, extractor, skipped: dict[str, str]) -> None:
    """Record MODEL's extractor key for _from_memo (best effort: a failure costs speed only)."""
    import json

    from ._version import __version__
    from .bundle import atomic_write_text
    from .feature_cache import CACHE_FORMAT

    backbone = extractor.backbone
    weights = backbone.weights_file
    if backbone.source == "offline":
        from .models.pretrained import offline_weights_file

        weights = str(offline_weights_file(backbone.name))
    if not weights:
        return
    try:
        try:
            memo = json.loads(_memo_path().read_text())
        except (OSError, ValueError):
            memo = {}
        known = memo.get(_memo_key(model), {}).get("undecodable", {})
        memo[_memo_key(model)] = {
            "key": extractor.key,
            "dim": extractor.dim,
            "backbone": backbone.name,
            "weights": weights,
            "weights_stat": _stat(weights),
            "stamp": [CACHE_FORMAT, __version__],
            "undecodable": _undecodable(skipped, known),
        }
        atomic_write_text(_memo_path(), json.dumps(memo, indent=1) + "\n")
    except OSError:
        pass


def embed(samples: _Samples, model: str | Path | None, quiet: bool) -> _Embedded:
    """Every image's embedding through the feature cache: straight from it when an earlier
    audit left them all there (no PyTorch import), else by the transfer extractor."""
    found = _from_memo(samples, model)
    if found is not None:
        return found
    from .training.features import Extractor

    backbone = audit_backbone(model)
    try:
        extractor = Extractor(backbone, quiet=quiet)
    except ImgrecError:
        raise
    except Exception as e:  # timm cannot build it (not a timm architecture, wrong weights)
        raise ModelError(
            f"--model {model}: cannot embed images with {backbone.name} ({type(e).__name__}: {e})",
            "give a pretrained backbone (imagenet) or a timm model's bundle",
        ) from None
    x, good, skipped = extractor.features(samples.paths, desc="embeddings")
    _remember(model, extractor, skipped)
    return _Embedded(
        x[:, 0], good, skipped, backbone.name, {k: int(v) for k, v in extractor.stats.items()}
    )


def out_of_sample_probs(
    x: np.ndarray, y: np.ndarray, n_classes: int, folds: int = FOLDS, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Each image's class probabilities from a logistic-regression head trained on the other
    folds (stratified k-fold); returns (N x C probabilities, k)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)  # no labels used: nothing leaks between folds
    probs = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class smaller than k, a slow convergence
        for train, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(z, y):
            head = LogisticRegression(C=HEAD_C, max_iter=1000).fit(z[train], y[train])
            probs[np.ix_(held, head.classes_)] = head.predict_proba(z[held])
    return probs, k


def label_issues(y: np.ndarray, probs: np.ndarray, filter_by: str = FILTER_BY) -> np.ndarray:
    """Indices of likely label errors (cleanlab), most likely first (self-confidence)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise ImgrecError(
            "the label audit needs cleanlab, which is not installed", "pip install 'imgrec[audit]'"
        ) from None
    present = np.flatnonzero(np.bincount(y, minlength=probs.shape[1]))
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    p = probs[:, present]
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(
            find_label_issues(
                remap[y], p, filter_by=filter_by, return_indices_ranked_by="self_confidence"
            )
        )


def similarity_pairs(
    xn: np.ndarray, near: float = NEAR_SIMILARITY, candidate: float = CANDIDATE_SIMILARITY
) -> dict[tuple[int, int], float]:
    """{(i, j): cosine similarity} for i < j: every pair at or over `near`, and each image
    with its most similar other image when that reaches `candidate` (rows in blocks)."""
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(xn), 1024):
        sims = xn[start : start + 1024] @ xn.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not itself
        best = sims.argmax(1)
        hits = set(zip(*np.nonzero(sims >= near), strict=True))
        hits |= {(a, int(best[a])) for a in rows.tolist() if sims[a, best[a]] >= candidate}
        for a, b in hits:
            i, j = sorted((start + int(a), int(b)))
            pairs[(i, j)] = float(sims[a, b])
    return pairs


def _thumbnail(path: str) -> np.ndarray | None:
    """A 32 x 32 grey thumbnail, zero mean and unit norm (None when it cannot be decoded)."""
    from PIL import Image

    from .images import decode_image

    try:
        img = decode_image(path, channels=1, draft_size=(64, 64))
    except (ImgrecError, OSError):
        return None
    v = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), np.float64).ravel()
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-9)


def near_duplicates(
    xn: np.ndarray,
    paths: list[str],
    near: float = NEAR_SIMILARITY,
    candidate: float = CANDIDATE_SIMILARITY,
) -> list[tuple[int, int, float, float]]:
    """(i, j, embedding similarity, pixel correlation) of the near duplicates: pairs whose
    embeddings reach `near` (the same content, or a crop, mirror or colour change of it),
    and look-alikes at or over `candidate` whose small grey thumbnails also correlate at or
    over PIXEL_CORRELATION (a resized or recompressed copy, which blurs the embedding)."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = similarity_pairs(xn, near, candidate)
    need = sorted({i for pair in pairs for i in pair})
    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow decodes without the GIL
        thumbs = dict(zip(need, pool.map(lambda i: _thumbnail(paths[i]), need), strict=True))
    out = []
    for (i, j), sim in pairs.items():
        a, b = thumbs[i], thumbs[j]
        corr = float(a @ b) if a is not None and b is not None else 0.0
        if sim >= near or corr >= PIXEL_CORRELATION:
            out.append((i, j, sim, corr))
    return out


def outlier_scores(xn: np.ndarray, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """(robust z-score of each image's distance to its k nearest neighbours, index of the
    nearest): 1 - mean cosine similarity, centred on the median and scaled by the MAD."""
    k = max(1, min(k, len(xn) - 1))
    dist = np.zeros(len(xn))
    nearest = np.zeros(len(xn), np.int64)
    for start in range(0, len(xn), 1024):
        sims = xn[start : start + 1024] @ xn.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not itself
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, 1)
        dist[start : start + len(rows)] = 1 - top_sims.mean(1)
        nearest[start : start + len(rows)] = top[rows, top_sims.argmax(1)]
    med = np.median(dist)
    mad = 1.4826 * np.median(np.abs(dist - med))
    return (dist - med) / max(mad, 1e-6), nearest


# -- records -------------------------------------------------------------------------------
def _issue_records(s: _Samples, idx: np.ndarray, probs: np.ndarray, rows: np.ndarray):
    out = []
    for i in idx.tolist():
        given, best = int(s.labels[rows[i]]), int(probs[i].argmax())
        out.append(
            {
                "kind": "label_issue",
                "path": s.rel[rows[i]],
                "split": s.splits[rows[i]],
                "given": s.classes[given],
                "suggested": s.classes[best],
                "score": round(1 - float(probs[i, given]), 4),
                "p_given": round(float(probs[i, given]), 4),
                "p_suggested": round(float(probs[i, best]), 4),
            }
        )
    return out


def _near_records(s: _Samples, pairs, rows: np.ndarray, layout: str) -> list[dict[str, Any]]:
    """Each pair flags its later file (train first, then by path) against its most similar
    earlier look-alike; a leak when the two sit in different splits."""

    def order(i: int) -> tuple[int, str]:
        return _SPLIT_ORDER.get(s.splits[rows[i]], 9), s.rel[rows[i]]

    best: dict[int, tuple[int, float, float]] = {}
    for i, j, sim, corr in pairs:
        first, second = sorted((i, j), key=order)
        if second not in best or max(sim, corr) > max(best[second][1:]):
            best[second] = (first, sim, corr)
    out = []
    for second, (first, sim, corr) in best.items():
        a, b = rows[second], rows[first]
        out.append(
            {
                "kind": "near_duplicate",
                "path": s.rel[a],
                "split": s.splits[a],
                "given": s.classes[s.labels[a]],
                "other": s.rel[b],
                "other_split": s.splits[b],
                "other_given": s.classes[s.labels[b]],
                "score": round(min(max(sim, corr), 1.0), 4),
                "similarity": round(min(sim, 1.0), 4),
                "pixel_correlation": round(corr, 4),
                "leak": layout == "split" and s.splits[a] != s.splits[b],
            }
        )
    return sorted(out, key=lambda r: (not r["leak"], -r["score"], r["path"]))


def _outlier_records(
    s: _Samples, z: np.ndarray, nearest: np.ndarray, rows: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    out = []
    for i in np.argsort(-z).tolist():
        if z[i] < threshold:
            break
        out.append(
            {
                "kind": "outlier",
                "path": s.rel[rows[i]],
                "split": s.splits[rows[i]],
                "given": s.classes[s.labels[rows[i]]],
                "score": round(float(z[i]), 2),
                "nearest": s.rel[rows[nearest[i]]],
            }
        )
    return out


def class_quality(
    s: _Samples, y: np.ndarray, probs: np.ndarray, issues: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per class: images, label issues given it, issues suggesting it, and its label quality
    (mean out-of-sample probability of the given label), worst first."""
    given = np.array([probs[i, c] for i, c in enumerate(y)])
    out = []
    for c, name in enumerate(s.classes):
        mine = y == c
        out.append(
            {
                "class": name,
                "images": int(mine.sum()),
                "label_issues": sum(r["given"] == name for r in issues),
                "suggested_here": sum(r["suggested"] == name for r in issues),
                "label_quality": round(float(given[mine].mean()), 4) if mine.any() else None,
            }
        )
    return sorted(out, key=lambda r: (r["label_quality"] is None, r["label_quality"] or 0))


# -- the audit -----------------------------------------------------------------------------
def audit(
    data: str | Path,
    model: str | Path | None = None,
    *,
    folds: int = FOLDS,
    near: float = NEAR_SIMILARITY,
    outlier_z: float = OUTLIER_Z,
    filter_by: str = FILTER_BY,
    seed: int = 0,
    quiet: bool = True,
) -> LabelAudit:
    """Audit a folder dataset's labels: likely label errors, near duplicates (leaks across
    splits) and outliers, from one embedding of each image (see the module docstring)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    root = Path(data).expanduser()
    s = _samples(root)
    e = embed(s, model, quiet)
    t_embed = time.perf_counter() - t0
    rows = np.flatnonzero(e.good)
    if len(rows) < 4:
        raise DataError(
            f"{root}: {len(rows)} readable image(s); the label audit needs more",
            "run `imgrec doctor DATA` to see what is wrong with the files",
        )
    with _one_blas_thread():
        found = _analyse(s, e, rows, t0, t_embed, (folds, near, outlier_z, filter_by, seed))
    found.timing["cpu"] = round(time.process_time() - cpu0, 2)  # this process, all threads
    return found


def _one_blas_thread():
    """BLAS on one thread for the analysis: its matrices are small, and OpenBLAS threads
    that wait for a busy core cost far more than they gain (the cross-validation on the mini
    set: 0.08 CPU s on one thread, 2.9 on two beside another program)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _analyse(
    s: _Samples, e: _Embedded, rows: np.ndarray, t0: float, t_embed: float, settings: tuple
) -> LabelAudit:
    folds, near, outlier_z, filter_by, seed = settings
    x, y = e.x[rows], s.labels[rows]
    probs, k = out_of_sample_probs(x, y, len(s.classes), folds, seed)
    issues = _issue_records(s, label_issues(y, probs, filter_by), probs, rows)
    t_cv = time.perf_counter() - t0 - t_embed
    xn = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    pairs = near_duplicates(xn, [s.paths[r] for r in rows], near)
    near_records = _near_records(s, pairs, rows, s.layout)
    z, nearest = outlier_scores(xn)
    records = issues + near_records + _outlier_records(s, z, nearest, rows, outlier_z)
    total = time.perf_counter() - t0
    return LabelAudit(
        s.root,
        s.layout,
        s.classes,
        e.backbone,
        len(rows),
        records,
        class_quality(s, y, probs, issues),
        float((probs.argmax(1) == y).mean()),
        k,
        e.skipped,
        {"embed": round(t_embed, 2), "cross_validation": round(t_cv, 2), "total": round(total, 2)},
        e.stats,
    )
