"""The evaluation report: one self-contained, offline HTML page (DIR/index.html, its PNGs
beside it, no scripts, fonts or anything fetched) with the headline metrics, the per-class
table, the confusion matrix, the most confident mistakes with their Grad-CAM overlays,
calibration (reliability diagram, expected calibration error, optional temperature scaling
stored in the bundle), the training curves from the bundle, and the data and bundle
fingerprints that tie the page to what produced it.
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, atomic_write_text
from .contract import fit_arrays, load_input
from .data.datasets import Dataset, load_dataset
from .errors import DataError, ImgrecError
from .evaluation import EvalReport, evaluate_bundle
from .figures import pyplot, save_figure
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
    plt = pyplot()

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
    """The dataset with the split the bundle trained with (as evaluate_bundle re-creates it)."""
    t = bundle.training
    return load_dataset(data, data_dir, val_fraction=t.get("val_fraction", 0.1),
                        test_fraction=t.get("test_fraction", 0.1), seed=t.get("seed", 0))


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


def _pixels_of(item: str, ds: Dataset, split: str, bundle: Bundle) -> np.ndarray:
    """The contract's uint8 C x H x W view of one evaluated input (a path or `name/split#i`)."""
    marker = f"{ds.name}/{split}#"
    if item.startswith(marker) and ds.splits[split].images is not None:
        i = int(item[len(marker):])
        return fit_arrays(ds.splits[split].images[i : i + 1], bundle.preprocess)[0]
    return load_input(item, bundle.preprocess)


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
                 mistakes: int = 12, gradcam: bool = True, quiet: bool = True) -> ReportResult:
    """Evaluate `model` on `data` and write DIR/index.html with its figures beside it."""
    from . import __version__

    bundle = model if isinstance(model, Bundle) else open_bundle(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = _dataset_for(bundle, data, data_dir)
    notes: list[str] = []
    t_before = bundle.temperature
    cal_before = None
    if calibrate:
        _, t_new, n_val = calibrate_bundle(bundle, ds, engine)
        notes.append(f"--calibrate: temperature {t_before:g} -> {t_new:g}, fitted on the "
                     f"validation split ({n_val} images) and stored in the bundle")
    rep = evaluate_bundle(bundle, ds, split, engine=engine)
    if calibrate and rep.split == "val":
        notes.append("the evaluated split is the validation split the temperature was fitted "
                     "on: its calibration is optimistic (add a test split)")
    if calibrate:
        cal_before = calibration_bins(rescale(rep.probs, bundle.temperature, t_before),
                                      rep.y_true)
    cal = calibration_bins(rep.probs, rep.y_true)

    conf_png = rep.plot_confusion(out / "confusion_matrix.png")
    plot_reliability(cal, out / "reliability.png",
                     f"Reliability: {ds.name} {rep.split} (temperature {bundle.temperature:g})")

    # training curves: the bundle's own figure, else drawn from its history
    curves = None
    src_curves = bundle.path / "curves.png"
    from .training.record import plot_curves, read_history

    history = read_history(bundle.path / "history.csv")
    if src_curves.is_file():
        curves = out / "curves.png"
        curves.write_bytes(src_curves.read_bytes())
    elif history:
        curves = out / "curves.png"
        plot_curves(curves, history, f"{bundle.name} training")

    # the most confident mistakes, with Grad-CAM overlays
    wrong = rep.mistakes(mistakes)
    gallery = out / "mistakes"
    gallery.mkdir(exist_ok=True)
    explainer = None
    if gradcam and wrong:
        try:
            from .explain import Explainer

            explainer = Explainer(bundle)
        except ImgrecError as e:
            notes.append(f"Grad-CAM overlays skipped: {e}")
    for k, m in enumerate(wrong):
        try:
            pixels = _pixels_of(m["input"], ds, rep.split, bundle)
        except ImgrecError as e:
            m["error"] = str(e)
            continue
        _save_png(pixels, gallery / f"{k:03d}.png")
        m["image"] = f"mistakes/{k:03d}.png"
        if explainer is not None:
            from .explain import save_overlay_png

            try:
                exp = explainer.gradcam(pixels, bundle.classes.index(m["predicted"]))
                save_overlay_png(exp, gallery / f"{k:03d}-gradcam.png")
                m["gradcam"] = f"mistakes/{k:03d}-gradcam.png"
            except ImgrecError as e:
                notes.append(f"Grad-CAM failed on {m['input']}: {e}")
                explainer = None
        i_true = bundle.classes.index(m["true"])
        idx = rep.inputs.index(m["input"])
        m["p_true"] = float(rep.probs[idx, i_true])

    fingerprint = {
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
    same = fingerprint["bundle trained on (fingerprint)"] == fingerprint["dataset fingerprint"]
    page = _html(bundle, rep, cal, cal_before, t_before, wrong, conf_png.name,
                 curves.name if curves else None, history, fingerprint, same, notes)
    index = out / "index.html"
    atomic_write_text(index, page)
    return ReportResult(index, rep, cal["ece"], bundle.temperature, t_before, wrong, notes)


# -- HTML ------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0;padding:20px 28px;color:#1d2330;background:#fafbfc;max-width:1220px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 10px;
border-bottom:1px solid #d8dde6;padding-bottom:4px}.sub{color:#5b6475;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.card{background:#fff;
border:1px solid #d8dde6;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#5b6475;font-size:12px}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #d8dde6;padding:4px 8px;text-align:right}
th{background:#eef1f6}td.l,th.l{text-align:left}
figure{margin:0;background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:8px}
figcaption{font-size:12px;color:#5b6475;margin-top:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.mistake{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:8px;font-size:12px}
.mistake .pair{display:flex;gap:6px}.mistake img{width:116px;height:116px;
object-fit:contain;image-rendering:pixelated;background:#000;border-radius:4px}
.bad{color:#b42318}.ok{color:#067647}.note{background:#fff8e6;border:1px solid #f1d38a;
padding:6px 10px;border-radius:6px;font-size:13px;margin:6px 0}
code{font-size:12px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _html(bundle: Bundle, rep: EvalReport, cal, cal_before, t_before, wrong, conf_png,
          curves_png, history, fingerprint, same, notes) -> str:
    per = rep.per_class()
    macro_f1 = float(np.mean([m["f1"] for m in per.values()])) if per else 0.0
    cards = [("accuracy", f"{rep.accuracy:.2%}"),
             ("top-5 accuracy", "-" if rep.top5_accuracy is None else f"{rep.top5_accuracy:.2%}"),
             ("macro F1", f"{macro_f1:.4f}"), ("images", f"{rep.n}"),
             ("mistakes", f"{int((rep.y_pred != rep.y_true).sum())}"),
             ("expected calibration error", f"{cal['ece']:.4f}")]
    if cal_before is not None:
        cards.append(("ECE before calibration", f"{cal_before['ece']:.4f}"))
    rows = "".join(
        f"<tr><td class=l>{_e(lab)}</td><td>{m['precision']:.4f}</td><td>{m['recall']:.4f}"
        f"</td><td>{m['f1']:.4f}</td><td>{m['support']}</td></tr>" for lab, m in per.items())
    items = []
    for m in wrong:
        if "image" not in m:
            items.append(f"<div class=mistake>{_e(m['input'])}: {_e(m.get('error', ''))}</div>")
            continue
        cam = (f"<img src='{_e(m['gradcam'])}' alt='Grad-CAM for {_e(m['predicted'])}' "
               f"title='Grad-CAM: where the evidence for {_e(m['predicted'])} is'>"
               if m.get("gradcam") else "")
        items.append(
            f"<div class=mistake><div class=pair><img src='{_e(m['image'])}' "
            f"alt='{_e(m['input'])}' title='model input'>{cam}</div>"
            f"<div>true <b class=ok>{_e(m['true'])}</b> ({m['p_true']:.1%})</div>"
            f"<div>predicted <b class=bad>{_e(m['predicted'])}</b> ({m['probability']:.1%})</div>"
            f"<div class=sub title='{_e(m['input'])}'>{_e(Path(m['input']).name)}</div></div>")
    gallery = ("<div class=gallery id=mistakes>" + "".join(items) + "</div>" if items else
               "<p id=mistakes>No mistakes on this split.</p>")
    if history:
        keys = [k for k in history[0] if k != "epoch"]
        hist_rows = "".join("<tr><td>" + _e(int(h["epoch"])) + "</td>" + "".join(
            f"<td>{h[k]:.4g}</td>" if isinstance(h.get(k), float) else f"<td>{_e(h.get(k))}</td>"
            for k in keys) + "</tr>" for h in history)
        hist = ("<table><tr><th>epoch</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys) +
                "</tr>" + hist_rows + "</table>")
    else:
        hist = "<p>The bundle has no training history (no history.csv).</p>"
    curves = (f"<figure><img src='{_e(curves_png)}' alt='training curves' width=760>"
              "<figcaption>loss and accuracy per epoch, from the bundle</figcaption></figure>"
              if curves_png else "")
    fp_rows = "".join(f"<tr><th class=l>{_e(k)}</th><td class=l><code>{_e(v)}</code></td></tr>"
                      for k, v in fingerprint.items())
    match = ("<span class=ok>the bundle was trained on exactly this dataset listing</span>"
             if same else "<span class=bad>the dataset differs from the one the bundle was "
             "trained on (or the bundle is pretrained)</span>")
    note_html = "".join(f"<div class=note>{_e(n)}</div>" for n in notes + (
        [f"skipped {len(rep.skipped)} unreadable file(s)"] if rep.skipped else []))
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>imgrec report: {_e(bundle.name)} on {_e(rep.dataset)} {_e(rep.split)}</title>
<style>{_CSS}</style></head><body>
<h1>{_e(bundle.name)} on {_e(rep.dataset)} / {_e(rep.split)}</h1>
<div class=sub>{_e(bundle.architecture.get('name'))}, {len(bundle.classes)} classes,
dataset fingerprint <code>{_e(fingerprint['dataset fingerprint'])}</code>,
weights <code>{_e(fingerprint['weights sha256'])}</code> — {match}</div>
{note_html}
<div class=cards>{''.join(f'<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                          for k, v in cards)}</div>
<h2>Confusion matrix and per-class metrics</h2>
<div class=row>
<figure id=confusion><img src='{_e(conf_png)}' alt='confusion matrix' width=560>
<figcaption>rows: true class, columns: predicted class</figcaption></figure>
<table id=per-class><tr><th class=l>class</th><th>precision</th><th>recall</th><th>F1</th>
<th>support</th></tr>{rows}</table>
</div>
<h2>Most confident mistakes</h2>
<p class=sub>Each: the model's input, and a Grad-CAM overlay of where it found evidence for the
wrong class (red = most).</p>
{gallery}
<h2>Calibration</h2>
<div class=row><figure id=calibration><img src='reliability.png' alt='reliability diagram'
width=480><figcaption>a calibrated model's bars follow the diagonal; expected calibration
error {cal['ece']:.4f} at temperature {bundle.temperature:g}
{'' if cal_before is None else f'(was {cal_before["ece"]:.4f} at {t_before:g})'}</figcaption>
</figure></div>
<h2>Training</h2>
{curves}
{hist}
<h2>Fingerprint</h2>
<table id=fingerprint>{fp_rows}</table>
<p class=sub>Written by imgrec {_e(fingerprint['imgrec'])}. Everything on this page is local:
no scripts, fonts or images are fetched.</p>
</body></html>
"""
