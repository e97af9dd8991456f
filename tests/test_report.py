"""The evaluation report: renders offline in headless Chromium with the confusion matrix and
the mistakes gallery visible; calibration maths; TensorBoard extras of training."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import main
from imgrec.report import calibration_bins, fit_temperature, rescale

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--window-size=1280,2000"]

PROBE = """<script>
window.addEventListener('load', () => {
  const rect = id => { const r = document.getElementById(id).getBoundingClientRect();
                       return [r.left, r.top, r.width, r.height]; };
  const images = [...document.images].map(i => ({src: i.getAttribute('src'),
      w: i.naturalWidth, shown: i.getBoundingClientRect().width,
      ok: i.complete && i.naturalWidth > 0}));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({images, confusion: rect('confusion'),
                                    mistakes: rect('mistakes')});
  document.body.appendChild(pre);
});
</script></body>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def probe_in_chromium(page: Path, probe: str, profile: Path) -> dict:
    """Open a copy of the page with `probe` (a script that writes JSON into <pre id=probe>
    on load) in headless Chromium, offline; the JSON it wrote."""
    copy = page.with_name("probe.html")
    copy.write_text(page.read_text().replace("</body>", probe))
    dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                          "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fast-cnn trained one epoch on the split shapes dataset, with TensorBoard on."""
    from conftest import make_shapes_dataset

    from imgrec.training.api import train

    root = tmp_path_factory.mktemp("report")
    data = make_shapes_dataset(root / "shapes", per_class=24, layout="split")
    result = train(str(data), model="fast-cnn", epochs=1, image_size=32, batch_size=16,
                   out=str(root / "bundle"), quiet=True, tensorboard=True, lr=1e-4)
    return result.bundle.path, data


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    overconfident = np.exp(logits)
    overconfident /= overconfident.sum(1, keepdims=True)
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(true_t, rel=0.08)
    before = calibration_bins(overconfident, y)["ece"]
    after = calibration_bins(rescale(overconfident, 1.0, t), y)["ece"]
    assert after < before / 3 and after < 0.03


def test_ece_of_known_bins():
    probs = np.array([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    y = np.array([0] * 9 + [1] + [0] * 3 + [1] * 7)  # 90% right at 0.9, 30% right at 0.6
    cal = calibration_bins(probs, y, bins=10)
    assert cal["ece"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.3)
    assert cal["count"].sum() == 20


def test_report_renders_offline_in_chromium(trained, tmp_path):
    bundle, data = trained
    out = tmp_path / "report"
    before = json.loads((bundle / "imgrec.json").read_text())["temperature"]
    assert main(["evaluate", str(bundle), str(data), "--report", str(out), "--calibrate",
                 "--json", str(tmp_path / "m.json")]) == 0
    meta = json.loads((bundle / "imgrec.json").read_text())
    assert before == 1.0 and meta["temperature"] != 1.0  # stored in the bundle
    calibration = json.loads((tmp_path / "m.json").read_text())["calibration"]
    assert calibration["temperature"] == meta["temperature"] and 0 <= calibration["ece"] <= 1
    index = out / "index.html"
    page = index.read_text()
    # self-contained: nothing fetched, no scripts
    assert "<script" not in page
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", page)
    assert refs and all(not re.match(r"^[a-z]+:", r) for r in refs), refs
    for r in refs:
        assert (out / r).is_file(), r
    for text in ("Confusion matrix", "Most confident mistakes", "expected calibration error",
                 "Fingerprint", "dataset fingerprint", "weights sha256", "temperature"):
        assert text in page, text
    fingerprint = json.loads((bundle / "imgrec.json").read_text())["training"]
    assert fingerprint["data_fingerprint"] in page
    metrics = json.loads((tmp_path / "m.json").read_text())
    wrong = int(metrics["n"] - round(metrics["accuracy"] * metrics["n"]))
    assert wrong > 0, "the one-epoch bundle should make mistakes to show"
    assert page.count("class=mistake>") == min(wrong, 12)
    assert page.count("-gradcam.png") == min(wrong, 12)
    assert (out / "curves.png").is_file() and (out / "reliability.png").is_file()

    # render it: probe a copy for loaded images and element positions, then screenshot
    chromium = _chromium()
    info = probe_in_chromium(index, PROBE, tmp_path / "u1")
    assert all(i["ok"] and i["shown"] > 0 for i in info["images"]), info["images"]
    srcs = {i["src"] for i in info["images"]}
    assert "confusion_matrix.png" in srcs and any("-gradcam.png" in s for s in srcs)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'u2'}",
                    f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1280)
    for name in ("confusion", "mistakes"):
        x, y, w, h = (int(v) for v in info[name])
        assert y + h <= 2000, f"{name} is below the first screen"
        region = pixels[y : y + h, x : x + w]
        assert region.std() > 20, f"{name} region renders blank"
    x, y, w, h = (int(v) for v in info["confusion"])
    region = pixels[y : y + h, x : x + w]
    blue = region[..., 2] > region[..., 0] + 40
    assert blue.mean() > 0.05  # the matrix's Blues cells are painted
    x, y, w, h = (int(v) for v in info["mistakes"])
    region = pixels[y : y + h, x : x + w]
    warm = (region[..., 0] > 150) & (region[..., 0] > region[..., 2] + 60)
    assert warm.any()  # Grad-CAM overlays (jet reds) in the gallery


def test_report_marks_the_mistakes_the_label_audit_flagged(trained, tmp_path, capsys):
    """evaluate --report --flagged: the mistakes whose files doctor --labels flagged (its
    --json findings, or a list of paths) carry a mark, and a note counts them."""
    from imgrec.report import build_report

    bundle, data = trained
    first = build_report(bundle, str(data), tmp_path / "r1", gradcam=False)
    wrong = [m["input"] for m in first.mistakes]
    assert wrong, "the one-epoch bundle should make mistakes to show"
    findings = tmp_path / "doctor.json"
    findings.write_text(json.dumps({"data": str(data), "issues": [
        {"kind": "label_issue", "path": str(Path(wrong[0]).relative_to(data))},
        {"kind": "near-duplicate", "path": str(Path(wrong[-1]).relative_to(data))}]}))
    listing = tmp_path / "flagged.txt"
    listing.write_text(f"{wrong[0]}\n")
    for flagged in (findings, listing):
        built = build_report(bundle, str(data), tmp_path / flagged.stem, gradcam=False,
                             flagged=flagged)
        assert built.path.read_text().count("flagged by the label audit") == 1
        assert [m["input"] for m in built.mistakes if m["flagged"]] == wrong[:1]
        assert any(n.startswith("1 of the ") for n in built.notes), built.notes
    assert main(["evaluate", str(bundle), str(data), "--flagged", str(listing)]) == 2
    assert "--flagged marks" in capsys.readouterr().err


def test_tensorboard_extras(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle, _ = trained
    ea = EventAccumulator(str(bundle), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/sample_batch", "val/confusion_matrix"} <= set(tags["images"])
    assert "lr" in tags["scalars"]
    grid = ea.Images("train/sample_batch")[0]
    assert grid.width >= 32 * 4
    assert [e.step for e in ea.Images("val/confusion_matrix")] == [1]


def test_evaluate_report_errors(trained, tmp_path, capsys):
    bundle, data = trained
    flat = tmp_path / "flat"
    for c in ("disc", "square"):
        (flat / c).mkdir(parents=True)
    assert main(["evaluate", str(bundle), str(flat), "--report", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("imgrec: error:")
    # --out (the PNG's folder without a report) was left unused without a word
    assert main(["evaluate", str(bundle), str(data), "--report", str(tmp_path / "r2"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--out is the confusion matrix's folder without --report" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "o").exists()


EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def odd_report(tmp_path_factory):
    """A report on a 1-channel invert=auto bundle whose classes, name and files are hostile
    HTML, the pixels evaluation scored (by input) and those Grad-CAM was given (in order)."""
    import csv

    from bundles import make_tiny_bundle

    from imgrec.evaluation import Predictor
    from imgrec.explain import Explainer
    from imgrec.report import build_report
    from imgrec.zoo import open_bundle

    root = tmp_path_factory.mktemp("odd")
    bundle = open_bundle(make_tiny_bundle(root / "bundle", channels=1, export=False))
    bundle.preprocess = bundle.preprocess.replace(invert="auto")
    bundle.classes = [EVIL, "a&b \"q\" 'x'", "plain"]
    bundle.extra["display_name"] = "tiny <b>bold</b>"
    bundle.write_meta()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        img = rng.integers(0, 40, (40, 40), np.uint8)  # light strokes on dark ...
        img[10:30, 15:25] = 230
        if i % 2:
            img = 255 - img  # ... or dark on light: invert=auto flips these
        path = root / f"img {i} & \"q\" 'x' <i>.png"
        Image.fromarray(img).save(path)
        rows.append([str(path), bundle.classes[i % 3], "test"])
    with (root / "odd&data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])

    scored: list[np.ndarray] = []
    explained: list[np.ndarray] = []
    probabilities, gradcam = Predictor.probabilities, Explainer.gradcam

    def spy_probabilities(self, pixels, *a, **k):
        scored.extend(pixels.copy())
        return probabilities(self, pixels, *a, **k)

    def spy_gradcam(self, source, *a, **k):
        explained.append(np.array(source, copy=True))
        return gradcam(self, source, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(Predictor, "probabilities", spy_probabilities)
    mp.setattr(Explainer, "gradcam", spy_gradcam)
    try:
        result = build_report(root / "bundle", str(root / "odd&data.csv"), root / "report")
    finally:
        mp.undo()
    return result, dict(zip(result.evaluation.inputs, scored, strict=True)), explained, rows


def test_report_escapes_labels_and_file_names(odd_report):
    from html.parser import HTMLParser

    result, _, _, rows = odd_report
    page = result.path.read_text()
    assert "<script" not in page and "<b>bold" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "tiny &lt;b&gt;bold&lt;/b&gt;" in page
    assert result.mistakes, "a random 3-class model makes mistakes"

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.alts, self.titles, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.alts.append(attrs.get("alt"))
            if "title" in attrs:
                self.titles.append(attrs["title"])

        def handle_data(self, data):
            self.text.append(data)

    parsed = Collect()
    parsed.feed(page)
    text = "".join(parsed.text)
    # every user string survives the round trip through the page, character for character
    assert EVIL in text and "a&b \"q\" 'x'" in text and "tiny <b>bold</b>" in text
    shown = [m["input"] for m in result.mistakes]
    assert set(shown) <= {r[0] for r in rows}
    assert set(shown) <= set(parsed.alts) and set(shown) <= set(parsed.titles)
    assert all(Path(s).name in text for s in shown)


def test_report_draws_the_pixels_evaluation_scored(odd_report):
    result, scored, explained, _ = odd_report
    out = result.path.parent
    inverted = 0
    for m in result.mistakes:
        pixels = scored[m["input"]]
        assert pixels.shape == (1, 32, 32)
        drawn = np.asarray(Image.open(out / m["image"]))
        np.testing.assert_array_equal(drawn, pixels[0])
        raw = np.asarray(Image.open(m["input"]).convert("L").resize((32, 32),
                                                                     Image.Resampling.BILINEAR))
        inverted += int(np.array_equal(pixels[0], 255 - raw))
    assert inverted, "some mistake should be a dark-on-light file that invert=auto flipped"
    assert len(explained) == len(result.mistakes)
    for m, given in zip(result.mistakes, explained, strict=True):
        np.testing.assert_array_equal(given, scored[m["input"]])
        assert (out / m["gradcam"]).is_file()
