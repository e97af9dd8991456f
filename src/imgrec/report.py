"""The evaluation report: one self-contained, offline HTML page (DIR/index.html, its PNGs
beside it, no scripts, fonts or anything fetched) with the headline metrics, the per-class
table, the confusion matrix, the most confident mistakes with their Grad-CAM overlays,
calibration (reliability diagram, expected calibration error, optional temperature scaling
stored in the bundle), the training curves from the bundle, and the data and bundle
fingerprints that tie the page to what produced it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, atomic_write_bytes, atomic_write_text
from .data.datasets import Dataset
from .errors import DataError, ImgrecError
from .evaluation import (
    EvalReport,
    evaluate_bundle,
    evaluated_pixels,
    evaluation_data,
    overlap_note,
    selection_note,
)
from .figures import drawing, save_figure
from .history import plot_curves, read_history
from .zoo import open_bundle

BINS = 15


# -- calibration -----------------------------------------------------------------------------
def calibration_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """Per equal-width confidence bin: count, mean confidence, accuracy; and the expected
    calibration error (Guo et al. 2017): sum over bins of |accuracy - confidence| * share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, conf, minlength=bins)
    acc_sum = np.bincount(which, correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, acc_sum / count, np.nan)
    n = max(1, len(conf))
    ece = float(np.nansum(np.abs(accuracy - mean_conf) * count) / n)
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy,
            "ece": ece}


def fit_temperature(probs: np.ndarray, y_true: np.ndarray, current: float = 1.0) -> float:
    """The temperature that minimises the negative log-likelihood on held-out data.

    Logits are recovered from the probabilities up to a per-row constant (softmax ignores it):
    z = T_current * log p. The NLL is unimodal in log T, so a golden-section search suffices."""
    z = current * np.log(np.clip(probs.astype(np.float64), 1e-300, None))
    idx = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[idx, y_true]))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def rescale(probs: np.ndarray, old: float, new: float) -> np.ndarray:
    """Probabilities computed at temperature `old`, re-expressed at `new`."""
    s = np.log(np.clip(probs.astype(np.float64), 1e-300, None)) * (old / new)
    s -= s.max(1, keepdims=True)
    e = np.exp(s)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


# -- figures -------------------------------------------------------------------------------
def _plt():
    plt = drawing()

    return plt


def plot_reliability(cal: dict[str, Any], path: Path, title: str) -> Path:
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6, 6.4), height_ratios=[3, 1], sharex=True)
    edges = cal["edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.nan_to_num(cal["accuracy"])
    ax.bar(centres, acc, width=width * 0.95, color="#4c78a8", edgecolor="black",
           label="accuracy in bin")
    conf = np.nan_to_num(cal["confidence"])
    ax.bar(centres, np.abs(conf - acc), bottom=np.minimum(conf, acc), width=width * 0.95,
           color="#e45756", alpha=0.35, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nexpected calibration error {cal['ece']:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centres, cal["count"], width=width * 0.95, color="#72b7b2", edgecolor="black")
    axc.set_xlabel("confidence (top-class probability)")
    axc.set_ylabel("images")
    axc.set_title("images per confidence bin", fontsize=9)
    save_figure(fig, path, dpi=90)
    return path


# -- the report ------------------------------------------------------------------------------
@dataclass
class ReportResult:
    path: Path
    evaluation: EvalReport
    ece: float
    temperature: float
    temperature_before: float
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _dataset_for(bundle: Bundle, data: str, data_dir: str | None) -> Dataset:
    """The dataset with the split the bundle trained with (its validation split)."""
    return evaluation_data(bundle, data, "val", data_dir)[0]


def calibrate_bundle(bundle: Bundle, data: Dataset | str, engine: str = "auto",
                     data_dir: str | None = None) -> tuple[float, float, int]:
    """Fit a temperature on the validation split and store it in the bundle's imgrec.json
    (predict.softmax divides logits by it). Returns (before, after, images used)."""
    ds = _dataset_for(bundle, data, data_dir) if isinstance(data, str) else data
    if "val" not in ds.splits:
        raise DataError(f"{ds.name} has no validation split to calibrate on",
                        "train with a validation split, or drop --calibrate")
    val = evaluate_bundle(bundle, ds, "val", engine=engine)
    before = bundle.temperature
    bundle.temperature = round(fit_temperature(val.probs, val.y_true, before), 4)
    bundle.write_meta()
    return before, bundle.temperature, val.n


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = pixels.transpose(1, 2, 0)
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(path)


def _sha(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def build_report(model: Bundle | str | Path, data: str, out: str | Path, split: str = "test",
                 data_dir: str | None = None, engine: str = "auto", calibrate: bool = False,
                 mistakes: int = 12, gradcam: bool = True, quiet: bool = True,
                 flagged: str | Path | None = None) -> ReportResult:
    """Evaluate `model` on `data` and write DIR/index.html with its figures beside it;
    `flagged`: the label audit's findings (or a list of paths) to mark the mistakes by."""
    bundle = model if isinstance(model, Bundle) else open_bundle(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds, split = evaluation_data(bundle, data, split, data_dir)
    notes: list[str] = []
    t_before = bundle.temperature
    rep, cal, cal_before = _evaluate(bundle, ds, split, engine, calibrate, notes)
    conf_png = rep.plot_confusion(out / "confusion_matrix.png")
    plot_reliability(cal, out / "reliability.png",
                     f"Reliability: {ds.name} {rep.split} (temperature {bundle.temperature:g})")
    curves, history = _training_curves(bundle, out)
    wrong = _mistakes_gallery(bundle, rep, ds, out / "mistakes", mistakes, gradcam, notes)
    if flagged is not None:
        _mark_flagged(rep, wrong, flagged, ds.source or data, notes)
    page = _Page(bundle, rep, cal, cal_before, t_before, wrong, conf_png.name,
                 curves.name if curves else None, history, _fingerprint(bundle, ds, data, rep),
                 notes, _tune_section(bundle, out))
    index = out / "index.html"
    atomic_write_text(index, render_html(page))
    return ReportResult(index, rep, cal["ece"], bundle.temperature, t_before, wrong, notes)


def _evaluate(bundle: Bundle, ds: Dataset, split: str, engine: str, calibrate: bool,
              notes: list[str]) -> tuple[EvalReport, dict[str, Any], dict[str, Any] | None]:
    """Evaluate (after fitting the temperature when `calibrate`): the report, its calibration
    and, when calibrated, the calibration at the temperature before."""
    t_before = bundle.temperature
    if calibrate:
        _, t_new, n_val = calibrate_bundle(bundle, ds, engine)
        notes.append(f"--calibrate: temperature {t_before:g} -> {t_new:g}, fitted on the "
                     f"validation split ({n_val} images) and stored in the bundle")
    rep = evaluate_bundle(bundle, ds, split, engine=engine)
    if rep.training_overlap:
        notes.append(overlap_note(rep))
    if (chosen := selection_note(rep, split, bundle)) is not None:
        notes.append(chosen)
    cal_before = None
    if calibrate:
        if rep.split == "val":
            notes.append("the evaluated split is the validation split the temperature was "
                         "fitted on: its calibration is optimistic (add a test split)")
        cal_before = calibration_bins(rescale(rep.probs, bundle.temperature, t_before),
                                      rep.y_true)
    return rep, calibration_bins(rep.probs, rep.y_true), cal_before


def _training_curves(bundle: Bundle, out: Path) -> tuple[Path | None, list[dict]]:
    """The bundle's own curves.png copied to `out`, else drawn from its history.csv; and the
    history (empty when the bundle has none)."""
    history = read_history(bundle.path / "history.csv")
    src = bundle.path / "curves.png"
    curves = out / "curves.png"
    if src.is_file():
        atomic_write_bytes(curves, src.read_bytes())
    elif history:
        plot_curves(curves, history, f"{bundle.name} training")
    else:
        return None, history
    return curves, history


def _explainer(bundle: Bundle, notes: list[str]) -> Any:
    """A Grad-CAM explainer for the bundle, or None (with a note) when it cannot have one."""
    try:
        from .explain import Explainer

        return Explainer(bundle)
    except ImgrecError as e:
        notes.append(f"Grad-CAM overlays skipped: {e}")
        return None


def _mistakes_gallery(bundle: Bundle, rep: EvalReport, ds: Dataset, gallery: Path, k: int,
                      gradcam: bool, notes: list[str]) -> list[dict[str, Any]]:
    """The k most confident mistakes, each drawn into `gallery` from the very pixels
    evaluation scored (evaluation.evaluated_pixels), with a Grad-CAM overlay beside it."""
    wrong = rep.mistakes(k)
    gallery.mkdir(exist_ok=True)
    explainer = _explainer(bundle, notes) if gradcam and wrong else None
    for i, m in enumerate(wrong):
        m["p_true"] = float(rep.probs[rep.inputs.index(m["input"]),
                                      bundle.classes.index(m["true"])])
        try:
            pixels = evaluated_pixels(m["input"], ds, rep.split, bundle.preprocess)
        except ImgrecError as e:
            m["error"] = str(e)
            continue
        _save_png(pixels, gallery / f"{i:03d}.png")
        m["image"] = f"{gallery.name}/{i:03d}.png"
        if explainer is not None and not _draw_gradcam(explainer, pixels, m, gallery,
                                                       f"{i:03d}-gradcam.png", notes):
            explainer = None  # one failure says the model cannot be explained: stop trying
    return wrong


def _mark_flagged(rep: EvalReport, wrong: list[dict[str, Any]], flagged: str | Path,
                  root: str, notes: list[str]) -> None:
    """Mark the mistakes whose file the label audit flagged, and say how many of all the
    split's mistakes it had flagged."""
    from .label_fixes import flagged_set

    listed = flagged_set(flagged, root)
    for m in wrong:
        m["flagged"] = Path(m["input"]).resolve() in listed
    missed = [rep.inputs[i] for i in np.flatnonzero(rep.y_pred != rep.y_true)]
    hit = sum(Path(p).resolve() in listed for p in missed)
    notes.append(f"{hit} of the {len(missed)} mistakes on this split are files the label "
                 f"audit flagged ({flagged})")


def _draw_gradcam(explainer: Any, pixels: np.ndarray, m: dict[str, Any], gallery: Path,
                  name: str, notes: list[str]) -> bool:
    """The Grad-CAM overlay for the predicted class of mistake `m`, saved as gallery/name."""
    from .explain import save_overlay_png

    try:
        exp = explainer.gradcam(pixels, explainer.classes.index(m["predicted"]))
        save_overlay_png(exp, gallery / name)
    except ImgrecError as e:
        notes.append(f"Grad-CAM failed on {m['input']}: {e}")
        return False
    m["gradcam"] = f"{gallery.name}/{name}"
    return True


def _fingerprint(bundle: Bundle, ds: Dataset, data: str, rep: EvalReport) -> dict[str, str]:
    """What ties the page to what produced it: data, bundle files, versions, time."""
    from ._version import __version__

    return {
        "dataset": ds.name, "dataset source": ds.source or data,
        "dataset fingerprint": ds.fingerprint(),
        "bundle trained on (fingerprint)": bundle.training.get("data_fingerprint", "unknown"),
        "bundle": str(bundle.path.resolve()), "architecture": bundle.architecture.get("name"),
        "weights sha256": _sha(bundle.weights_path) if bundle.weights_path.is_file() else "-",
        "model.onnx sha256": _sha(bundle.onnx_path) if bundle.onnx_path.is_file() else "-",
        "imgrec.json sha256": _sha(bundle.path / "imgrec.json"),
        "bundle created": bundle.extra.get("created", "unknown"),
        "classes": str(len(bundle.classes)), "split evaluated": f"{rep.split} ({rep.n} images)",
        "temperature": f"{bundle.temperature:g}", "imgrec": __version__,
        "report written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- HTML ------------------------------------------------------------------------------------
@dataclass
class _Page:
    """Everything the page shows."""

    bundle: Bundle
    rep: EvalReport
    cal: dict[str, Any]
    cal_before: dict[str, Any] | None
    t_before: float
    wrong: list[dict[str, Any]]
    confusion_png: str
    curves_png: str | None
    history: list[dict]
    fingerprint: dict[str, str]
    notes: list[str]
    tune: dict[str, Any] | None = None  # the search that chose the options (imgrec tune)


def _tune_section(bundle: Bundle, out: Path) -> dict[str, Any] | None:
    """The search that chose this bundle's options (imgrec tune records it in the bundle),
    with its optimisation-history figure when the bundle still sits in the search's folder."""
    t = bundle.training.get("tune")
    if not t:
        return None
    n, value = t.get("trials", {}), t.get("value")
    rows = [("study", f"{t.get('study')} ({t.get('storage')})"),
            ("best trial", f"{t.get('trial')} of {n.get('finished', '?')} finished "
                           f"({n.get('complete', '?')} complete, {n.get('pruned', '?')} pruned, "
                           f"{n.get('fail', 0)} failed)"),
            (f"validation {t.get('metric')}", "-" if value is None else f"{value:.4f}"),
            ("training images", "all" if not t.get("subset") else f"a subset of {t['subset']}"),
            ("test split", f"{t.get('test_split')}; every trial was scored on validation only")]
    params = [(k, f"{v:.4g}" if isinstance(v, float) else str(v))
              for k, v in (t.get("params") or {}).items()]
    figure = bundle.path.parent / "optimization_history.png"
    png = None
    if figure.is_file():
        png = "optimization_history.png"
        atomic_write_bytes(out / png, figure.read_bytes())
    return {"rows": rows, "params": params, "history_png": png}


def _cards(page: _Page, per: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    rep = page.rep
    macro_f1 = float(np.mean([m["f1"] for m in per.values()])) if per else 0.0
    cards = [("accuracy", f"{rep.accuracy:.2%}"),
             ("top-5 accuracy", "-" if rep.top5_accuracy is None else f"{rep.top5_accuracy:.2%}"),
             ("macro F1", f"{macro_f1:.4f}"), ("images", f"{rep.n}"),
             ("mistakes", f"{int((rep.y_pred != rep.y_true).sum())}"),
             ("expected calibration error", f"{page.cal['ece']:.4f}")]
    if page.cal_before is not None:
        cards.append(("ECE before calibration", f"{page.cal_before['ece']:.4f}"))
    return cards


def _mistake_view(m: dict[str, Any]) -> dict[str, Any]:
    """One gallery entry, its numbers formatted (the template escapes every value)."""
    if "image" not in m:
        return {"image": None, "input": m["input"], "error": m.get("error", "")}
    return {"image": m["image"], "gradcam": m.get("gradcam"), "input": m["input"],
            "name": Path(m["input"]).name, "true": m["true"], "p_true": f"{m['p_true']:.1%}",
            "predicted": m["predicted"], "probability": f"{m['probability']:.1%}",
            "flagged": m.get("flagged", False)}


def _history_table(history: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(column names after `epoch`, rows of formatted cells) of the training history."""
    if not history:
        return [], []
    keys = [k for k in history[0] if k != "epoch"]
    rows = [[str(int(h["epoch"]))] + [f"{h[k]:.4g}" if isinstance(h.get(k), float)
                                      else str(h.get(k)) for k in keys] for h in history]
    return keys, rows


def _context(page: _Page) -> dict[str, Any]:
    """The template's variables: strings and lists of strings, numbers already formatted."""
    bundle, rep, fp = page.bundle, page.rep, page.fingerprint
    per = rep.per_class()
    history_keys, history_rows = _history_table(page.history)
    skipped = [f"skipped {len(rep.skipped)} unreadable file(s)"] if rep.skipped else []
    return {
        "model": bundle.name, "dataset": rep.dataset, "split": rep.split,
        "architecture": bundle.architecture.get("name"), "n_classes": len(bundle.classes),
        "fingerprint": fp,
        "same_data": fp["bundle trained on (fingerprint)"] == fp["dataset fingerprint"],
        "notes": page.notes + skipped, "cards": _cards(page, per),
        "confusion_png": page.confusion_png,
        "per_class": [{"label": lab, "precision": f"{m['precision']:.4f}",
                       "recall": f"{m['recall']:.4f}", "f1": f"{m['f1']:.4f}",
                       "support": m["support"]} for lab, m in per.items()],
        "mistakes": [_mistake_view(m) for m in page.wrong],
        "ece": f"{page.cal['ece']:.4f}", "temperature": f"{bundle.temperature:g}",
        "ece_before": None if page.cal_before is None else f"{page.cal_before['ece']:.4f}",
        "temperature_before": f"{page.t_before:g}",
        "curves_png": page.curves_png, "history_keys": history_keys, "tune": page.tune,
        "history_rows": history_rows,
    }


def template_environment():
    """The templates in imgrec/templates, autoescaped: labels and file names are user data."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("imgrec", "templates"),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def render_html(page: _Page) -> str:
    """The report page (templates/report.html.j2)."""
    return template_environment().get_template("report.html.j2").render(_context(page))
