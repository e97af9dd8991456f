"""Evaluation: metrics, the DESIGN.md JSON schema, the confusion PNG, confident mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import trained_shapes, truncated_jpeg

from imgrec.cli import main
from imgrec.errors import DataError
from imgrec.evaluation import EvalReport, evaluate_bundle

DESIGN_KEYS = {"accuracy", "top5_accuracy", "n", "labels", "confusion_matrix", "per_class"}


def _report(n_classes: int, probs: np.ndarray, y_true: list[int]) -> EvalReport:
    labels = [f"c{i}" for i in range(n_classes)]
    return EvalReport(labels, np.array(y_true), probs.astype(np.float32),
                      [f"img{i}" for i in range(len(y_true))], "test", "toy")


def test_metrics_by_hand():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    rep = _report(3, probs, [0, 1, 1, 0])
    assert rep.accuracy == 0.5 and rep.n == 4
    assert rep.top5_accuracy is None  # only with more than 5 classes
    assert rep.confusion().tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    pc = rep.per_class()
    assert pc["c0"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert pc["c1"]["precision"] == 1.0 and pc["c1"]["recall"] == 0.5
    assert pc["c2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    table = rep.table()
    assert "precision" in table and "confusion matrix" in table and "c2" in table


def test_mistakes_sorted_by_confidence():
    probs = np.array([[0.2, 0.8], [0.45, 0.55], [0.05, 0.95], [0.9, 0.1], [0.3, 0.7]])
    rep = _report(2, probs, [0, 0, 0, 0, 1])
    wrong = rep.mistakes(10)
    assert [m["input"] for m in wrong] == ["img2", "img0", "img1"]
    assert [m["probability"] for m in wrong] == sorted((m["probability"] for m in wrong),
                                                       reverse=True)
    assert wrong[0] == {"input": "img2", "true": "c0", "predicted": "c1",
                        "probability": pytest.approx(0.95)}
    assert len(rep.mistakes(1)) == 1
    assert len(rep.summary(2)["mistakes"]) == 2 and len(rep.summary()["mistakes"]) == 3


def test_top5_with_more_than_five_classes():
    rng = np.random.default_rng(0)
    probs = rng.random((50, 7))
    y = rng.integers(0, 7, 50)
    rep = _report(7, probs, y.tolist())
    top5 = np.argsort(-probs, 1)[:, :5]
    assert rep.top5_accuracy == pytest.approx(float((top5 == y[:, None]).any(1).mean()))
    assert rep.top5_accuracy >= rep.accuracy
    assert _report(5, rng.random((4, 5)), [0, 1, 2, 3]).top5_accuracy is None


def test_evaluate_bundle_json_schema_and_png(tmp_path_factory, tmp_path):
    base = trained_shapes(tmp_path_factory)
    rep = evaluate_bundle(base / "bundle", str(base / "shapes"), "test")
    assert rep.split == "test" and rep.n == 8 and rep.accuracy >= 0.75

    out = tmp_path / "m.json"
    rep.write_json(out)
    data = json.loads(out.read_text())
    assert DESIGN_KEYS <= set(data)
    assert isinstance(data["accuracy"], float) and 0 <= data["accuracy"] <= 1
    assert data["top5_accuracy"] is None  # two classes
    assert data["n"] == 8 and data["labels"] == ["disc", "square"]
    cm = data["confusion_matrix"]
    assert len(cm) == 2 and all(len(r) == 2 for r in cm) and sum(map(sum, cm)) == 8
    assert sum(cm[i][i] for i in range(2)) / 8 == pytest.approx(data["accuracy"])
    assert set(data["per_class"]) == {"disc", "square"}
    for m in data["per_class"].values():
        assert set(m) == {"precision", "recall", "f1", "support"}
        assert isinstance(m["support"], int)
    assert sum(m["support"] for m in data["per_class"].values()) == 8

    png = rep.plot_confusion(tmp_path / "deep" / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli(tmp_path_factory, tmp_path, capsys):
    base = trained_shapes(tmp_path_factory)
    out = tmp_path / "metrics.json"
    code = main(["evaluate", str(base / "bundle"), str(base / "shapes"), "--json", str(out),
                 "--report", str(tmp_path / "rep")])
    text = capsys.readouterr().out
    assert code == 0
    assert "accuracy" in text and "confusion matrix" in text
    assert (tmp_path / "rep" / "confusion_matrix.png").is_file()
    assert DESIGN_KEYS <= set(json.loads(out.read_text()))
    # --mistakes sets how many the JSON lists too (it always listed 10)
    wrong = round((1 - json.loads(out.read_text())["accuracy"]) * json.loads(out.read_text())["n"])
    for k in (0, 1):
        assert main(["evaluate", str(base / "bundle"), str(base / "shapes"), "--mistakes",
                     str(k), "--json", str(out)]) == 0
        assert len(json.loads(out.read_text())["mistakes"]) == min(k, wrong)
    # the default figure folder is beside the data, never inside the bundle it reads
    before = sorted(p.name for p in (base / "bundle").rglob("*"))
    assert main(["evaluate", str(base / "bundle"), str(base / "shapes"), "--split", "val"]) == 0
    assert (base / "shapes-eval-bundle-val" / "confusion_matrix.png").is_file()
    assert sorted(p.name for p in (base / "bundle").rglob("*")) == before


def test_a_held_out_folder_is_scored_whole(tmp_path_factory, tmp_path, capsys):
    """A folder of held-out photos (not the training data, no split folders) is scored in
    full, not cut like the training folder into a 10% test share."""
    import shutil

    base = trained_shapes(tmp_path_factory)
    held = tmp_path / "held-out"
    for cls in ("disc", "square"):
        (held / cls).mkdir(parents=True)
        for f in sorted((base / "shapes" / cls).glob("*.png"))[:6]:
            shutil.copy(f, held / cls / f.name)
    rep = evaluate_bundle(base / "bundle", str(held), "test")
    assert rep.split == "all" and rep.n == 12
    capsys.readouterr()
    assert main(["evaluate", str(base / "bundle"), str(held), "--out", str(tmp_path / "e")]) == 0
    headline = capsys.readouterr().out.splitlines()[0]
    assert headline.startswith("held-out all: accuracy") and headline.endswith("(n=12)")
    assert main(["evaluate", str(base / "bundle"), str(held)]) == 0  # the default folder
    assert (tmp_path / "held-out-eval-bundle-all" / "confusion_matrix.png").is_file()
    # the training folder, even as another path to it, keeps its unseen test share
    assert evaluate_bundle(base / "bundle", str(base / "shapes" / "."), "test").n == 8


def test_another_folder_of_the_training_folders_name_is_held_out(tmp_path_factory, tmp_path,
                                                                   monkeypatch):
    """A bundle trained on `shapes` (relative) took any folder called `shapes`, from another
    working folder, for its training data: it scored that folder's 10% "test" share, or
    refused it, instead of all of it. Only the recorded absolute path decides."""
    import shutil

    from imgrec.bundle import read_bundle

    base = trained_shapes(tmp_path_factory)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(base / "bundle", bundle_dir)
    bundle = read_bundle(bundle_dir)
    # as a run given `shapes` from its own working folder records it
    bundle.training.update(data="shapes", data_path=str((base / "shapes").resolve()))
    bundle.write_meta()
    other = tmp_path / "elsewhere" / "shapes"
    for cls in ("disc", "square"):
        (other / cls).mkdir(parents=True)
        for f in sorted((base / "shapes" / cls).glob("*.png"))[:5]:
            shutil.copy(f, other / cls / f.name)
    monkeypatch.chdir(other.parent)
    rep = evaluate_bundle(bundle_dir, "shapes", "test")
    assert rep.split == "all" and rep.n == 10
    monkeypatch.chdir(base)  # the training folder itself, by the same relative name
    assert evaluate_bundle(bundle_dir, "shapes", "test").split == "test"
    # a moved checkout: the recorded folder is gone, the name as given decides again
    bundle.training["data_path"] = str(tmp_path / "gone" / "shapes")
    bundle.write_meta()
    assert evaluate_bundle(bundle_dir, "shapes", "test").split == "test"


def test_evaluate_skips_bad_files(tmp_path_factory, tmp_path):
    base = trained_shapes(tmp_path_factory)
    csv_path = tmp_path / "list.csv"
    good = sorted((base / "shapes" / "disc").glob("*.png"))[:3]
    train = [sorted((base / "shapes" / c).glob("*.png"))[5] for c in ("disc", "square")]
    bad = truncated_jpeg(tmp_path / "bad.jpg")
    csv_path.write_text("path,label,split\n" + "".join(f"{p},disc,test\n" for p in good)
                        + f"{bad},disc,test\n" + f"{train[0]},disc,train\n"
                        + f"{train[1]},square,train\n")
    rep = evaluate_bundle(base / "bundle", str(csv_path), "test")
    assert rep.n == 3 and list(rep.skipped) == [str(bad)]


def test_evaluate_unknown_classes(tmp_path_factory, tmp_path):
    base = trained_shapes(tmp_path_factory)
    data = tmp_path / "other"
    for cls in ("cow", "disc"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            (data / cls / f"{i}.png").write_bytes((base / "shapes" / "disc" /
                                                    "disc_000.png").read_bytes())
    with pytest.raises(DataError, match="cow"):
        evaluate_bundle(base / "bundle", str(data), "test")


@pytest.mark.parametrize("n_classes, dataset", [
    (2, "shapes"),
    (3, "a-dataset-folder-with-a-rather-long-name-" * 4),
    (12, "cifar10 (a copy of the training folder, re-labelled by hand)"),
    (60, "x" * 150),
    (4, "WM" * 70),  # the widest letters, no space to break at
])
def test_confusion_title_is_inside_the_figure(tmp_path, monkeypatch, n_classes, dataset):
    """The title over the matrix once ran off the figure's left edge for long titles."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    labels = [f"class {i} with a long-ish name" for i in range(n_classes)]
    rep = EvalReport(labels, rng.integers(0, n_classes, 300),
                     rng.random((300, n_classes)).astype(np.float32),
                     [f"img{i}" for i in range(300)], "test", dataset)
    seen = []
    savefig = Figure.savefig

    def measure(fig, *args, **kwargs):
        out = savefig(fig, *args, **kwargs)
        fig.canvas.draw()  # as saved: laid out at the figure's size
        renderer = fig.canvas.get_renderer()
        titles = [t for t in [fig._suptitle, *(ax.title for ax in fig.axes)]
                  if t is not None and t.get_text()]
        seen.append((fig.bbox.bounds, [(t.get_text(), t.get_window_extent(renderer).bounds)
                                       for t in titles]))
        return out

    monkeypatch.setattr(Figure, "savefig", measure)
    rep.plot_confusion(tmp_path / "cm.png")
    [((_, _, width, height), titles)] = seen
    assert titles and "".join(dataset.split()) in "".join(titles[0][0].split())
    for text, (x, y, w, h) in titles:
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, (text, x, w, width)


def test_evaluating_the_training_images_says_so(tmp_path_factory, tmp_path, capsys):
    """A copy of the training folder evaluated as held-out data reported its accuracy with
    no word that the model had trained on those very images. The bundle now records its
    training images' digests; evaluate counts and says how many it scores."""
    import shutil

    base = trained_shapes(tmp_path_factory)
    digests = (base / "bundle" / "training-images.sha256").read_text().split()
    assert digests and all(len(d) == 64 for d in digests)
    copy = tmp_path / "copy"
    shutil.copytree(base / "shapes", copy)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(base / "bundle"), str(copy), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "all" and report["training_overlap"] == len(digests)
    assert f"{len(digests)} of these {report['n']} images are this model's own training" in \
        capsys.readouterr().err
    assert main(["evaluate", str(base / "bundle"), str(copy), "--report",
                 str(tmp_path / "rep")]) == 0  # the report says it too, and once
    said = capsys.readouterr()
    assert (said.out + said.err).count("are this model's own training images") == 1
    assert "own training images (the same bytes)" in (tmp_path / "rep" / "index.html").read_text()
    assert main(["evaluate", str(base / "bundle"), str(base / "shapes"), "--json",
                 str(out)]) == 0  # its own data: the test split it held out
    assert json.loads(out.read_text())["training_overlap"] == 0
    assert "training images" not in capsys.readouterr().err


def test_a_held_out_pixel_csv_scores_a_sign_language_model(tmp_path):
    """A Sign-Language-MNIST model's classes are letters (its training file says "sign");
    a held-out copy named otherwise read its labels as digits and was refused as classes the
    model does not know."""
    from types import SimpleNamespace

    from helpers import write_pixel_csv

    from imgrec.data.datasets import load_dataset
    from imgrec.evaluation import _label_map

    ds = load_dataset(str(write_pixel_csv(tmp_path / "holdout.csv", [0, 2, 3] * 4, side=4)))
    assert ds.classes == ["0", "2", "3"]
    model = SimpleNamespace(classes=["A", "B", "C", "D"])
    assert _label_map(model, ds).tolist() == [0, 2, 3]
    with pytest.raises(DataError, match="classes the model does not know"):
        _label_map(SimpleNamespace(classes=["cat", "dog"]), ds)


def test_scoring_the_validation_split_that_chose_the_best_epoch_is_called_optimistic():
    """A folder with no test/ had its validation split scored in place of test, the split
    that picked the best epoch, and nothing said the figure was optimistic."""
    from types import SimpleNamespace

    from imgrec.evaluation import selection_note

    bundle = SimpleNamespace(training={"best_epoch": 4, "dataset": "cd"})
    val = SimpleNamespace(split="val", dataset="cd")
    assert "optimistic" in selection_note(val, "test", bundle)
    assert selection_note(val, "val", bundle) is None  # asked for by name
    assert selection_note(SimpleNamespace(split="test", dataset="cd"), "test", bundle) is None
    assert selection_note(SimpleNamespace(split="val", dataset="other"), "test", bundle) is None
