"""imgrec studio through its HTTP API alone: the whole flow on cats-dogs-mini (create, classes,
upload, train, predict, export, restart), and the refusals (names, non-images, a second train)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
from fastapi.testclient import TestClient  # noqa: E402

import imgrec  # noqa: E402
from imgrec.cli import main  # noqa: E402
from imgrec.errors import ImgrecError  # noqa: E402
from imgrec.predict import Predictor  # noqa: E402
from imgrec.studio.app import create_app  # noqa: E402
from imgrec.studio.store import Store, check_name  # noqa: E402

API = "/v1/studio/projects"


def _photos(cats_dogs, split: str, cls: str, n: int, skip: int = 0):
    return sorted((cats_dogs / split / cls).glob("*.jpg"))[skip:skip + n]


def _upload(client, project: str, cls: str, paths) -> dict:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = client.post(f"{API}/{project}/classes/{cls}/images", files=files)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(client, project: str, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = client.get(f"{API}/{project}/train").json()
        if state["state"] in ("done", "failed"):
            return state
        assert state["state"] == "running" and 0 <= state["progress"] <= 1
        time.sleep(0.5)
    raise AssertionError("training did not end")


@pytest.mark.parametrize("name", ["../x", "a/b", "x\x00y", "a" * 300, "..", ".hidden", "",
                                  "\u3042" * 90])  # 90 characters, but 270 bytes
def test_bad_names_are_refused(tmp_path, name):
    client = TestClient(create_app(tmp_path))
    r = client.post(API, json={"name": name})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    client.post(API, json={"name": "p"})
    r = client.post(f"{API}/p/classes", json={"name": name})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert Store(tmp_path).projects() == ["p"] and list((tmp_path / "p" / "data").iterdir()) == []
    with pytest.raises(ImgrecError):
        check_name(name)


def test_a_long_non_ascii_project_is_created_and_deleted(tmp_path):
    """50 Japanese characters (150 bytes) fit, and the project can be deleted again: its
    trash name, the name and a time stamp, is still a legal folder name."""
    client = TestClient(create_app(tmp_path))
    name = "\u3042" * 50
    assert client.post(API, json={"name": name}).status_code == 201
    assert client.delete(f"{API}/{name}").status_code == 204
    assert Store(tmp_path).projects() == []


def test_uploads_are_checked_deduplicated_and_trashed(tmp_path, cats_dogs):
    client = TestClient(create_app(tmp_path))
    assert "cdn" not in client.get("/docs").text  # serve's offline Swagger UI
    paths = client.get("/openapi.json").json()["paths"]
    assert {f"{API}/{{project}}/train", f"{API}/{{project}}/bundle.zip",
            "/v1/predict"} <= set(paths)
    assert client.post(API, json={"name": "p"}).status_code == 201
    assert client.post(f"{API}/p/classes", json={"name": "cat"}).status_code == 201
    assert client.post(f"{API}/p/classes", json={"name": "cat"}).status_code == 409
    r = client.post(f"{API}/p/classes/cat/images", files=[("files", ("x.jpg", b"not an image"))])
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert list((tmp_path / "p" / "data" / "cat").iterdir()) == []
    photos = _photos(cats_dogs, "train", "cat", 2)
    files = [("files", (p.name, p.read_bytes())) for p in photos]
    r = client.post(f"{API}/p/classes/cat/images", files=[*files, files[0],
                                                         ("files", ("bad.png", b"\x89PNG..."))])
    assert r.json()["added"] == 2 and r.json()["duplicates"] == 1
    assert [x["filename"] for x in r.json()["rejected"]] == ["bad.png"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for p in _photos(cats_dogs, "train", "cat", 3):
            z.writestr(f"photos/{p.name}", p.read_bytes())
        z.writestr("photos/notes.txt", "not an image")
        z.writestr("__MACOSX/photos/._x.jpg", "resource fork")
    r = client.post(f"{API}/p/classes/cat/images", files=[("files", ("a.zip", archive.getvalue()))])
    assert r.json()["added"] == 1 and r.json()["duplicates"] == 2, r.json()
    assert [x["filename"] for x in r.json()["rejected"]] == ["a.zip/photos/notes.txt"]
    names = client.get(f"{API}/p").json()["classes"][0]["images"]
    assert len(names) == 3 and not list((tmp_path / "p" / "data" / "cat").glob(".*"))
    assert client.get(f"{API}/p/classes/cat/images/{names[0]}").content == \
        (tmp_path / "p" / "data" / "cat" / names[0]).read_bytes()
    assert client.delete(f"{API}/p/classes/cat/images/{names[0]}").status_code == 204
    assert len(client.get(f"{API}/p").json()["classes"][0]["images"]) == 2
    assert (tmp_path / "p" / "trash" / "cat" / names[0]).is_file()
    assert client.get(f"{API}/p/bundle.zip").status_code == 404
    assert client.get(f"{API}/nope/train/events").status_code == 404
    r = client.post(f"{API}/p/classes/cat/rename", json={"name": "kitten"})
    assert [c["name"] for c in r.json()["classes"]] == ["kitten"]
    assert client.post(f"{API}/p/classes/kitten/rename", json={"name": "../x"}).status_code == 400
    assert client.post(f"{API}/p/rename", json={"name": "q"}).json()["name"] == "q"
    assert (tmp_path / "q" / "data" / "kitten").is_dir() and not (tmp_path / "p").exists()
    assert client.delete(f"{API}/q").status_code == 204 and client.get(API).json() == []
    assert len(list((tmp_path / ".trash").iterdir())) == 1  # deleted, not erased


def test_the_whole_flow_then_a_restart(tmp_path, cats_dogs, capsys):
    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "pets"})
    for cls in ("cat", "dog"):
        client.post(f"{API}/pets/classes", json={"name": cls})
        assert _upload(client, "pets", cls, _photos(cats_dogs, "train", cls, 30))["added"] == 30
    started = time.perf_counter()
    r = client.post(f"{API}/pets/train")
    assert r.status_code == 202 and r.json()["state"] == "running"
    r = client.post(f"{API}/pets/train")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    with client.stream("GET", f"{API}/pets/train/events") as events:  # live, until it is over
        assert events.headers["content-type"].startswith("text/event-stream")
        pushed = [json.loads(line[6:]) for line in events.iter_lines()
                  if line.startswith("data: ")]
    assert pushed[0]["state"] == "running" and pushed[-1]["state"] == "done", pushed[-1]
    assert pushed[-1]["validation"] is not None and len(pushed) >= 2
    progress = [p["progress"] for p in pushed]
    assert progress == sorted(progress)
    state = _wait(client, "pets")
    print(f"trained in {time.perf_counter() - started:.1f} s: {state}")
    assert state["state"] == "done", state
    assert state["val_accuracy"] >= 0.95 and state["progress"] == 1.0
    for _ in range(120):  # the confusion matrix follows the model
        if (validation := client.get(f"{API}/pets/train").json()["validation"]) is not None:
            break
        time.sleep(0.5)
    assert validation["labels"] == ["cat", "dog"]
    assert sum(map(sum, validation["confusion_matrix"])) == 20  # a third of 60 photos
    assert min(validation["per_class_accuracy"].values()) >= 0.9
    held_out = _photos(cats_dogs, "validation", "dog", 1)[0]
    r = client.post(f"{API}/pets/predict", files={"file": held_out.read_bytes()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "predictions", "elapsed_ms"}
    assert body["predictions"][0]["label"] == "dog"
    r = client.get(f"{API}/pets/bundle.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    unzipped = tmp_path / "unzipped"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(unzipped)
    assert (unzipped / "model.onnx").is_file()
    label = Predictor.load(unzipped).predict([str(held_out)])[0][0].label
    assert label == body["predictions"][0]["label"]
    capsys.readouterr()
    assert main(["predict", "--model", str(unzipped), str(held_out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "dog"
    assert not (unzipped / "model.int8.onnx").exists()
    # the int8 download: quantized once, on the project's own photos, then kept
    r = client.get(f"{API}/pets/bundle.zip", params={"int8": "true"})
    assert r.status_code == 200, r.text
    assert 'filename="pets-model-int8.zip"' in r.headers["content-disposition"]
    quantized = tmp_path / "pets" / "model" / "model.int8.onnx"
    made = quantized.stat().st_mtime_ns
    unzipped8 = tmp_path / "unzipped-int8"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(unzipped8)
    export = json.loads((unzipped8 / "imgrec.json").read_text())["export"]
    assert export["int8"] == "model.int8.onnx" and export["int8_held_out"]
    assert export["int8_top1_agreement"] >= 0.9 and "training images" in export[
        "int8_calibration"]
    assert main(["predict", "--model", str(unzipped8), "--int8", str(held_out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "dog"
    assert client.get(f"{API}/pets/bundle.zip?int8=true").status_code == 200
    assert quantized.stat().st_mtime_ns == made  # not quantized again
    assert "model.int8.onnx" not in zipfile.ZipFile(io.BytesIO(
        client.get(f"{API}/pets/bundle.zip").content)).namelist()
    # the evaluation report of the validation photos, and nothing outside its folder
    r = client.get(f"{API}/pets/report/index.html")
    assert r.status_code == 200 and "confusion_matrix.png" in r.text, r.text[:300]
    r = client.get(f"{API}/pets/report/confusion_matrix.png")
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert client.get(f"{API}/pets/report/..%2Fdata%2Fcat").status_code == 404
    # a restart in the middle of a training: projects, images and the last good model intact
    (tmp_path / "pets" / "training.json").write_text("{}")
    (tmp_path / "pets" / ".model-half").mkdir()
    again = TestClient(create_app(tmp_path))
    projects = again.get(API).json()
    assert [p["name"] for p in projects] == ["pets"] and projects[0]["has_model"]
    assert [c["count"] for c in projects[0]["classes"]] == [30, 30]
    state = again.get(f"{API}/pets/train").json()
    assert state["state"] == "failed" and "restart" in state["message"]
    assert (tmp_path / "pets" / "model" / "studio.json").is_file()
    assert not (tmp_path / "pets" / ".model-half").exists()
    r = again.post(f"{API}/pets/predict", files={"file": held_out.read_bytes()})
    assert r.json()["predictions"][0]["label"] == "dog"
    # "serve this model": the studio's own /v1/predict, remembered across restarts
    assert again.post("/v1/predict", content=held_out.read_bytes()).status_code == 404
    assert again.post(f"{API}/pets/serve").json() == {"project": "pets"}
    r = TestClient(create_app(tmp_path)).post("/v1/predict", content=held_out.read_bytes())
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "dog"
    # curl --data-binary sends a raw image as application/x-www-form-urlencoded: still the
    # image (FastAPI's form parsing had consumed it: 500 "Stream consumed")
    form_typed = {"Content-Type": "application/x-www-form-urlencoded"}
    for url in ("/v1/predict", f"{API}/pets/predict"):
        r = again.post(url, content=held_out.read_bytes(), headers=form_typed)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "dog", r.text


def test_quantizing_and_training_exclude_each_other(tmp_path):
    """The int8 download quantizes the model folder in place: refused while the project
    trains, and a training (or a second quantization) is refused until it is done."""
    from imgrec.errors import Conflict
    from imgrec.studio.trainer import Trainer, TrainStatus

    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "p"})
    photo = (Path(imgrec.__file__).parent / "samples" / "chelsea.jpg").read_bytes()
    for cls in ("a", "b"):
        client.post(f"{API}/p/classes", json={"name": cls})
        assert client.post(f"{API}/p/classes/{cls}/images",
                           files=[("files", (f"{cls}.jpg", photo, "image/jpeg"))]).json()[
            "added"] == 1
    trainer = Trainer(Store(tmp_path))
    with trainer.quantizing("p"):
        with pytest.raises(Conflict, match="being quantized"):
            trainer.start("p", None)
        with pytest.raises(Conflict, match="quantized already"), trainer.quantizing("p"):
            pass
    trainer.status["p"] = TrainStatus("running")
    with pytest.raises(Conflict, match="is training"), trainer.quantizing("p"):
        pass
    r = client.get(f"{API}/p/bundle.zip?int8=true")
    assert r.status_code == 404 and "no model yet" in r.json()["error"]["message"]


def test_the_command(monkeypatch, tmp_path, capsys):
    import imgrec.export
    import imgrec.studio.app

    calls = []
    monkeypatch.setattr(imgrec.studio.app, "run_studio", lambda *a: calls.append(a))
    assert main(["studio", "--dir", str(tmp_path), "--port", "8123"]) == 0
    assert calls == [(tmp_path, "127.0.0.1", 8123)]
    assert "/studio" in capsys.readouterr().out
    (tmp_path / "a-file").write_text("")  # a --dir it cannot use: one line before starting
    assert main(["studio", "--dir", str(tmp_path / "a-file")]) == 2 and len(calls) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgrec: error: --dir"), err
    monkeypatch.setattr(imgrec.export, "torch_available", lambda: False)
    assert main(["studio"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imgrec[train]" in err[0], err


def test_progress_says_about_how_long_is_left():
    """The live message estimates the rest at the epochs' mean pace so far."""
    from imgrec.studio import trainer

    assert trainer.time_left(100.0, 3, 10, now=130.0) == ", about 70 s left"
    assert trainer.time_left(100.0, 1, 10, now=130.0) == ", about 4 min left"
    assert trainer.time_left(100.0, 10, 10, now=130.0) == ""
    assert trainer.time_left(None, 1, 10, now=130.0) == ""
    status = trainer.TrainStatus()
    progress = trainer.Progress(status)
    clock = iter([130.0, 136.0])
    progress.clock = lambda: next(clock)
    progress.on_epoch_begin(None, 1)

    class State:
        epochs = 4

    progress.on_epoch_end(State(), 2, {"val_acc": 0.9})
    assert status.message == "epoch 2/4: val_acc 0.900, about 6 s left"


def test_progress_moves_while_the_features_are_extracted():
    """Extraction (most of a studio run) fills the first half of the bar, the epochs the
    rest; it never goes back."""
    from imgrec.studio import trainer

    status = trainer.TrainStatus()
    progress = trainer.Progress(status)
    progress.on_extract(None, 0, 40)
    assert status.progress == 0.0 and status.message == "features: 0/40 photos"
    progress.on_extract(None, 20, 40)
    assert status.progress == 0.25
    progress.on_extract(None, 40, 40)
    assert status.progress == 0.5
    progress.on_note(None, "cache   0 feature vectors reused, 40 computed (9.1s)")
    assert status.progress == 0.5

    class State:
        epochs = 10

    progress.on_epoch_begin(State(), 1)
    progress.on_epoch_end(State(), 1, {"val_acc": 0.5})
    assert status.progress == 0.545
    progress.on_epoch_end(State(), 10, {"val_acc": 0.9})
    assert status.progress == 0.95


def test_doctor_warnings_name_the_photos_they_concern(tmp_path):
    """A photo doctor would flag (here: tiny) is listed with its class/file path, which the
    page marks beside its thumbnail; an empty project has none."""
    from PIL import Image

    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "p"})
    client.post(f"{API}/p/classes", json={"name": "a"})
    assert client.get(f"{API}/p/warnings").json() == []
    tiny, fine = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (6, 6), (200, 30, 30)).save(tiny, "PNG")
    Image.linear_gradient("L").convert("RGB").save(fine, "PNG")
    r = client.post(f"{API}/p/classes/a/images",
                    files=[("files", ("tiny.png", tiny.getvalue(), "image/png")),
                           ("files", ("fine.png", fine.getvalue(), "image/png"))])
    assert r.json()["added"] == 2
    names = client.get(f"{API}/p").json()["classes"][0]["images"]
    found = client.get(f"{API}/p/warnings").json()
    tiny_found = [w for w in found if w["kind"] == "tiny"]
    assert len(tiny_found) == 1 and tiny_found[0]["detail"].startswith("6x6 pixels"), found
    assert all(w["path"].split("/")[0] == "a" and w["path"].split("/")[1] in names
               for w in found)


def test_a_training_project_keeps_its_classes_and_images(tmp_path, cats_dogs):
    """While a project trains (its marker file is there), deleting or renaming what the run
    reads is refused with 409 (the model would name classes the project no longer has);
    a project with an empty class, or a single class, is refused before a run starts."""
    from imgrec.studio.store import TRAINING_MARKER

    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "p"})
    for cls in ("cat", "dog"):
        client.post(f"{API}/p/classes", json={"name": cls})
        _upload(client, "p", cls, _photos(cats_dogs, "train", cls, 2))
    client.post(f"{API}/p/classes", json={"name": "bird"})
    r = client.post(f"{API}/p/train")
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "'bird' of project 'p' has no images" in message
    assert client.delete(f"{API}/p/classes/bird").status_code == 204
    (tmp_path / "p" / TRAINING_MARKER).write_text("{}")  # as the trainer does while it runs
    name = _photos(cats_dogs, "train", "cat", 1)[0].name
    for method, url in (("delete", f"{API}/p/classes/dog"),
                        ("post", f"{API}/p/classes/dog/rename"),
                        ("delete", f"{API}/p/classes/cat/images/{name}"),
                        ("post", f"{API}/p/rename"), ("delete", f"{API}/p"),
                        ("post", f"{API}/p/classes")):  # a new class failed the run
        kwargs = {"json": {"name": "q"}} if method == "post" else {}
        r = getattr(client, method)(url, **kwargs)
        assert r.status_code == 409 and "is training" in r.json()["error"]["message"], (url, r.text)
    (tmp_path / "p" / TRAINING_MARKER).unlink()
    assert client.delete(f"{API}/p/classes/dog").status_code == 204
    r = client.post(f"{API}/p/train")
    assert r.status_code == 400 and "needs two or more" in r.json()["error"]["message"]


def test_renaming_the_served_project_keeps_it_served(tmp_path):
    store = Store(tmp_path)
    store.create_project("pets")
    (tmp_path / ".served").write_text("pets")
    store.rename_project("pets", "pets2")
    assert (tmp_path / ".served").read_text() == "pets2"
    store.create_project("other")
    store.rename_project("other", "other2")  # not the served one: left alone
    assert (tmp_path / ".served").read_text() == "pets2"


def test_deleting_the_served_project_serves_nothing_and_same_name_renames_are_no_ops(tmp_path):
    client = TestClient(create_app(tmp_path))
    store = Store(tmp_path)
    store.create_project("pets")
    store.create_class("pets", "cat")
    assert client.post(f"{API}/pets/rename", json={"name": "pets"}).status_code == 200
    r = client.post(f"{API}/pets/classes/cat/rename", json={"name": "cat"})
    assert r.status_code == 200 and "cat" in r.text
    (tmp_path / ".served").write_text("pets")
    store.create_project("other")
    store.delete_project("other")  # not the served one: left alone
    assert (tmp_path / ".served").read_text() == "pets"
    assert client.delete(f"{API}/pets").status_code == 204
    assert not (tmp_path / ".served").exists()
    r = client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n")
    assert r.status_code == 404 and "no project is served yet" in r.json()["error"]["message"]


def test_one_studio_per_folder_and_its_banner_comes_after_the_checks(tmp_path, monkeypatch,
                                                                       capsys):
    """A second `imgrec studio` on the same --dir is refused while the first runs (it marked
    the first one's live training failed and lost a model); a port in use is the only line."""
    import socket

    from imgrec.serve.launch import page_url
    from imgrec.studio import app as studio_app

    inner = {}

    def run(root, host, port, log_level="info"):
        inner["rc"] = main(["studio", "--dir", str(root), "--port", "0"])
        inner["err"] = capsys.readouterr().err

    monkeypatch.setattr(studio_app, "run_studio", run)
    assert main(["studio", "--dir", str(tmp_path / "s"), "--port", "0"]) == 0
    assert inner["rc"] == 2 and "is in use by another imgrec run" in inner["err"]
    assert not (tmp_path / "s" / ".imgrec.lock").exists()  # released when it stops
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        capsys.readouterr()
        assert main(["studio", "--dir", str(tmp_path / "t"), "--port",
                     str(busy.getsockname()[1])]) == 2
        out = capsys.readouterr()
        assert "studio on" not in out.out and "in use" in out.err
    assert page_url("::1", 8000) == "http://[::1]:8000/"
    assert page_url("0.0.0.0", 8000, "/studio") == "http://localhost:8000/studio"
    assert "free port" in page_url("127.0.0.1", 0)


def test_a_zip_with_nothing_to_keep_is_refused_by_name(tmp_path):
    """A broken zip alone answered 200 with nothing added, an empty one a 415 that named
    no zip: both are refused, the message naming the archive (or its member)."""
    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "p"})
    client.post(f"{API}/p/classes", json={"name": "a"})
    empty, texts = io.BytesIO(), io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    with zipfile.ZipFile(texts, "w") as z:
        z.writestr("notes.txt", "not a photo")
    cases = {"broken.zip": (b"PK\x03\x04garbage", "broken.zip: unreadable zip"),
             "empty.zip": (empty.getvalue(), "empty.zip: it holds no files"),
             "texts.zip": (texts.getvalue(), "texts.zip/notes.txt: not an image")}
    for name, (body, says) in cases.items():
        r = client.post(f"{API}/p/classes/a/images",
                        files=[("files", (name, body, "application/zip"))])
        assert 400 <= r.status_code < 500 and says in r.json()["error"]["message"], r.text


def test_split_names_bools_and_non_latin_names_get_answers_not_failures(tmp_path):
    """A class called "train" made the project a split layout (the run then found no class
    folders); {"epochs": true} trained 1 epoch; bundle.zip of a project named in CJK was a
    500 (its Content-Disposition could not be encoded)."""
    from imgrec.studio.routes import attachment

    client = TestClient(create_app(tmp_path))
    client.post(API, json={"name": "p"})
    client.post(f"{API}/p/classes", json={"name": "cat"})
    for name in ("train", "Validation", "test"):
        r = client.post(f"{API}/p/classes", json={"name": name})
        assert r.status_code == 400 and "dataset split" in r.json()["error"]["message"]
        r = client.post(f"{API}/p/classes/cat/rename", json={"name": name})
        assert r.status_code == 400
    r = client.post(f"{API}/p/train", json={"epochs": True})
    assert r.status_code == 422
    header = attachment("ünï 猫-model.zip")
    header.encode("latin-1")  # what the server must send
    assert header.startswith('attachment; filename="_n_ _-model.zip"; ')
    assert "filename*=UTF-8''%C3%BCn%C3%AF%20%E7%8C%AB-model.zip" in header
