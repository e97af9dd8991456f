"""imgrec doctor DATA --labels (issue 14): on copies of cats-dogs-mini, flipped labels fill
the top of the label-issue ranking and the clean set is barely flagged; a resized, recompressed
copy in validation is a near-duplicate leak; a terminal screenshot is an outlier; a fix list
applied and undone leaves every file byte-identical; the page renders offline in Chromium;
`imgrec train --exclude` leaves listed files out; bad input is one line and exit 2.

The embeddings go through the session's feature cache (conftest: IMGREC_CACHE in a temporary
folder), so the mini set is embedded once, cold, and every later audit reads it back."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from imgrec.cli import main
from imgrec.errors import ImgrecError

FLIP_SHARE = 0.05
SEED = 0


def _mirror(src: Path, dst: Path, copy: bool = False) -> Path:
    """DIR/<split>/<class>/*.jpg of src as symlinks (or copies) under dst."""
    for p in sorted(src.rglob("*.jpg")):
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(p, q)
        else:
            q.symlink_to(p)
    return dst


def _flip(root: Path, share: float = FLIP_SHARE, seed: int = SEED) -> set[str]:
    """Move a seeded random share of the training images into the other class folder; the
    relative paths they have now."""
    train = sorted((root / "train").glob("*/*.jpg"))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(train), round(share * len(train)), replace=False)
    moved = set()
    for i in sorted(picked.tolist()):
        p = train[i]
        other = "dog" if p.parent.name == "cat" else "cat"
        q = root / "train" / other / p.name
        p.rename(q)
        moved.add(str(q.relative_to(root)))
    return moved


def _screenshot(path: Path) -> None:
    """A terminal screenshot: light monospace text on a dark window."""
    img = Image.new("RGB", (640, 400), (20, 20, 24))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    for i in range(24):
        draw.text(
            (8, 8 + 16 * i),
            f"user@host:~/imgrec$ imgrec train data --epochs {i} # loss 0.{i:03d} acc 9{i % 10}.1%",
            fill=(200, 220, 200),
            font=font,
        )
    img.save(path)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean(cats_dogs, tmp_path_factory) -> Path:
    return _mirror(cats_dogs, tmp_path_factory.mktemp("audit") / "clean")


@pytest.fixture(scope="module")
def clean_audit(clean):
    from imgrec import audit

    return audit(clean)


def test_clean_set_is_barely_flagged(clean_audit):
    a = clean_audit
    assert a.images == 600 and a.classes == ["cat", "dog"] and a.model == "efficientnet_lite0"
    issues = a.flagged("label_issue")
    assert len(issues) <= 0.03 * a.images, issues
    assert a.cv_accuracy > 0.95
    # the one real near duplicate of the set (doctor's test: the same photo of four puppies)
    assert [(r["path"], r["other"], r["leak"]) for r in a.of("near_duplicate")] == [
        ("train/dog/dog.74.jpg", "train/dog/dog.180.jpg", False)
    ]
    assert {q["class"] for q in a.class_quality} == {"cat", "dog"}
    assert all(0.9 < q["label_quality"] <= 1 for q in a.class_quality)


def test_flipped_labels_top_the_ranking(clean_audit, cats_dogs, tmp_path):
    from imgrec import audit

    data = _mirror(cats_dogs, tmp_path / "flipped")
    flipped = _flip(data)
    assert len(flipped) == 25
    a = audit(data)
    assert a.cache["computed"] == 0  # the same pictures: all from the cache
    ranked = a.flagged("label_issue")
    top = ranked[: len(flipped)]
    precision = len(flipped & set(top)) / len(flipped)
    recall = len(flipped & set(ranked)) / len(flipped)
    print(
        f"flipped {len(flipped)}: top-k precision {precision:.2f}, flagged {recall:.2f} "
        f"({len(ranked)} flagged of {a.images})"
    )
    assert precision >= 0.8 and recall >= 0.9
    # each flipped file's suggestion is its true class
    by_path = {r["path"]: r for r in a.of("label_issue")}
    for rel in flipped & set(ranked):
        assert by_path[rel]["suggested"] != by_path[rel]["given"]
        assert by_path[rel]["given"] == Path(rel).parent.name


def test_resized_copy_is_a_leak_and_a_screenshot_an_outlier(clean_audit, cats_dogs, tmp_path):
    from imgrec import audit

    data = _mirror(cats_dogs, tmp_path / "planted")
    with Image.open(cats_dogs / "train/dog/dog.12.jpg") as im:
        w, h = im.size
        im.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC).save(
            data / "validation/dog/dog.12-copy.jpg", quality=60
        )
    _screenshot(data / "train/cat/terminal.png")
    a = audit(data)
    assert a.cache["computed"] == 2
    leaks = [r for r in a.of("near_duplicate") if r["leak"]]
    assert [(r["path"], r["other"]) for r in leaks] == [
        ("validation/dog/dog.12-copy.jpg", "train/dog/dog.12.jpg")
    ]
    outliers = [r["path"] for r in a.of("outlier")]
    assert "train/cat/terminal.png" in outliers[:3], a.of("outlier")


def test_doctor_labels_then_apply_fixes_and_undo(cats_dogs, clean_audit, tmp_path, capsys):
    """The whole command line on real copies: --labels writes the JSON, the page and the fix
    list; --apply-fixes moves the flipped files home; --undo restores every byte."""
    data = _mirror(cats_dogs, tmp_path / "data", copy=True)
    flipped = _flip(data, share=0.02, seed=1)
    out = tmp_path / "out"
    assert (
        main(
            [
                "doctor",
                str(data),
                "--labels",
                "--json",
                str(out / "doctor.json"),
                "--report",
                str(out / "page"),
                "--fix-list",
                str(out / "fixes.csv"),
                "--top",
                "3",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "label issues:" in text and "more (--json FILE" in text
    findings = json.loads((out / "doctor.json").read_text())
    issues = [i for i in findings["issues"] if i["kind"] == "label_issue"]
    found = flipped & {i["path"] for i in issues}
    assert len(found) >= 0.9 * len(flipped)
    assert all({"path", "given", "suggested", "score", "detail"} <= set(i) for i in issues)
    assert findings["label_audit"]["counts"]["label_issue"] == len(issues)
    # the Python API gives the same records
    from imgrec import audit

    api = [{k: v for k, v in i.items() if k != "detail"} for i in issues]
    assert api == audit(data).of("label_issue")
    rows = list(csv.DictReader((out / "fixes.csv").open()))
    assert len(rows) == len(issues) and set(rows[0]) == {"path", "given", "suggested"}
    assert all(Path(r["path"]).is_absolute() for r in rows)  # it applies from any folder

    before = _tree_hashes(data)
    assert main(["doctor", "--apply-fixes", str(out / "fixes.csv")]) == 0
    moved = _tree_hashes(data)
    assert sorted(moved.values()) == sorted(before.values())  # moved, never rewritten
    for rel in found:  # back in their true class folder
        home = Path(rel).parent.parent / ("dog" if Path(rel).parent.name == "cat" else "cat")
        assert moved[str(home / Path(rel).name)] == before[rel]
    manifest = out / "fixes.applied.json"
    capsys.readouterr()
    assert main(["doctor", "--apply-fixes", str(out / "fixes.csv")]) == 2
    assert "was applied already" in capsys.readouterr().err  # not "no such file"
    assert main(["doctor", "--undo", str(manifest)]) == 0
    assert _tree_hashes(data) == before
    assert not manifest.exists() and (out / "fixes.applied.undone.json").is_file()


def test_a_warm_audit_reads_the_cache_alone(clean_audit, cats_dogs, tmp_path, monkeypatch):
    """Once every image (and every undecodable file) is known, an audit reads the feature
    cache without the extractor (no PyTorch import: the warm audit's speed)."""
    from imgrec import audit
    from imgrec.training import features

    data = _mirror(cats_dogs, tmp_path / "broken")
    (data / "train/cat/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    first = audit(data)
    assert list(first.skipped) == [str(data / "train/cat/broken.jpg")]

    def no_extractor(*args, **kwargs):
        raise AssertionError("the extractor ran")

    monkeypatch.setattr(features, "Extractor", no_extractor)
    again = audit(data)
    assert again.skipped == first.skipped and again.images == 600
    assert again.records == first.records


def test_a_bundle_embeds_as_its_backbone(clean_audit, cats_dogs, tmp_path):
    """--model BUNDLE: the bundle's network without its classifier. The offline ImageNet
    bundle is Lite0 with the same weights, so its embeddings are the default backbone's."""
    from imgrec.label_audit import _samples, embed
    from imgrec.zoo import pretrained_bundle

    data = tmp_path / "small"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for p in sorted((cats_dogs / "train" / cls).glob("*.jpg"))[:6]:
            (data / cls / p.name).symlink_to(p)
    samples = _samples(data)
    bundle = pretrained_bundle("imagenet").path
    by_bundle = embed(samples, str(bundle), quiet=True)
    assert by_bundle.backbone == "efficientnet_lite0" and by_bundle.stats["computed"] == 12
    default = embed(samples, None, quiet=True)
    assert default.stats["computed"] == 0  # the mini set's, cached by the first audit
    np.testing.assert_allclose(by_bundle.x, default.x, atol=1e-4)


PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({src: i.getAttribute('src'),
      ok: i.complete && i.naturalWidth > 0, shown: i.getBoundingClientRect().width}));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({images,
      cards: document.querySelectorAll('.item').length});
  document.body.appendChild(pre);
});
</script></body>"""


def test_report_renders_offline_in_chromium(clean_audit, tmp_path):
    from test_report import probe_in_chromium

    from imgrec.label_report import write_report

    # a label to escape: the page is a template with autoescape
    records = list(clean_audit.records)
    records[0] = {**records[0], "given": "<b>cat</b>"}
    a = dataclasses.replace(clean_audit, records=records)
    page = write_report(a, tmp_path / "page")
    html = page.read_text()
    assert "<script" not in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    refs = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", html)
    assert refs and all(not re.match(r"^[a-z]+:", r) for r in refs), refs
    assert all((page.parent / r).is_file() for r in refs)
    cards = len(a.of("label_issue")) + len(a.of("near_duplicate")) + len(a.of("outlier"))
    scores = [
        float(s)
        for s in re.findall(
            r"score <span class=score>([\d.]+)", html.split("<h2>Near duplicates")[0]
        )
    ]
    assert scores == sorted(scores, reverse=True)

    info = probe_in_chromium(page, PROBE, tmp_path / "u")
    assert info["cards"] == cards
    assert info["images"] and all(i["ok"] and i["shown"] > 0 for i in info["images"])


def test_train_exclude_leaves_listed_files_out(tmp_path):
    from conftest import make_shapes_dataset

    from imgrec.training.config import TrainConfig
    from imgrec.training.plan import make_plan

    data = make_shapes_dataset(tmp_path / "shapes", per_class=8, layout="split")
    listing = tmp_path / "fixes.csv"
    listing.write_text(
        "path,given,suggested\n"
        f"{data / 'train/disc/disc_000.png'},disc,square\n"
        "train/square/square_001.png,square,disc\n"
    )
    full = make_plan(TrainConfig(data=str(data), model="fast-cnn", quiet=True))
    plan = make_plan(
        TrainConfig(data=str(data), model="fast-cnn", quiet=True, exclude=str(listing))
    )
    assert len(full.data.splits["train"]) - len(plan.data.splits["train"]) == 2
    kept = {Path(p).name for p in plan.data.splits["train"].paths}
    assert "disc_000.png" not in kept and "square_001.png" not in kept
    assert "excluded 2 file(s)" in plan.data.notes[-1]
    text = tmp_path / "list.txt"
    text.write_text("# one path per line\ntest/disc/disc_000.png\n")
    plan = make_plan(TrainConfig(data=str(data), model="fast-cnn", quiet=True, exclude=str(text)))
    assert len(plan.data.splits["test"]) == len(full.data.splits["test"]) - 1
    # a list that takes every training image of a class is refused, as an empty class is
    every_disc = tmp_path / "discs.txt"
    every_disc.write_text("".join(f"{p}\n" for p in full.data.splits["train"].paths
                                  if "/disc/" in p))
    with pytest.raises(ImgrecError, match="leaves class.*'disc' without a training image"):
        make_plan(TrainConfig(data=str(data), model="fast-cnn", quiet=True,
                              exclude=str(every_disc)))


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgrec: error:") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert "not a folder" in _one_line_exit_2(
        ["doctor", str(tmp_path / "nowhere"), "--labels"], capsys
    )
    data = tmp_path / "d"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (80 * i, 40, 200 if cls == "a" else 0)).save(
                data / cls / f"{cls}{i}.png"
            )
    assert "no_such_net" in _one_line_exit_2(
        ["doctor", str(data), "--labels", "--model", "no_such_net"], capsys
    )
    assert "no such bundle" in _one_line_exit_2(
        ["doctor", str(data), "--labels", "--model", str(tmp_path / "no-bundle")], capsys
    )
    from bundles import make_tiny_bundle

    scratch = make_tiny_bundle(tmp_path / "scratch", export=False)  # fast-cnn, from scratch
    assert "trained from scratch" in _one_line_exit_2(
        ["doctor", str(data), "--labels", "--model", str(scratch)], capsys
    )
    _one_line_exit_2(["doctor", str(data), "--model", "imagenet"], capsys)  # without --labels
    _one_line_exit_2(["doctor", "--apply-fixes", str(tmp_path / "missing.csv")], capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    assert "not a fix list" in _one_line_exit_2(["doctor", "--apply-fixes", str(bad)], capsys)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"path,given,suggested\n{data / 'a/a0.png'},a,b\n{data / 'a/a1.png'},b,a\n")
    before = _tree_hashes(data)
    assert "not in its given" in _one_line_exit_2(["doctor", "--apply-fixes", str(wrong)], capsys)
    wrong.write_text(f"path,given,suggested\n{data / 'a/a0.png'},a,c\n")
    assert "no class folder" in _one_line_exit_2(["doctor", "--apply-fixes", str(wrong)], capsys)
    assert _tree_hashes(data) == before  # nothing moved
    _one_line_exit_2(["train", str(data), "--exclude", str(tmp_path / "none.txt")], capsys)


def test_the_fix_list_suggests_no_class_for_an_outlier(tmp_path):
    """A label issue that is also an outlier (a rocket among cats and dogs) looks like no
    class: the fix list does not move it into one; the other label issues are listed with
    absolute paths."""
    from imgrec.label_fixes import read_fix_list, write_fix_list

    records = [
        {"kind": "label_issue", "path": "cat/rocket.jpg", "given": "cat", "suggested": "dog"},
        {"kind": "label_issue", "path": "cat/dog.7.jpg", "given": "cat", "suggested": "dog"},
        {"kind": "outlier", "path": "cat/rocket.jpg", "given": "cat", "score": 4.3},
        {"kind": "near_duplicate", "path": "dog/a.jpg"},
    ]
    rows = read_fix_list(write_fix_list(records, tmp_path / "data", tmp_path / "fixes.csv"))
    assert rows == [{"path": str((tmp_path / "data" / "cat" / "dog.7.jpg").resolve()),
                     "given": "cat", "suggested": "dog"}]
