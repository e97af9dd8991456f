"""The model registry (timm-style `register_model`, a leaf module) and timm's interface on
imgrec's own networks, whose state-dict keys must stay those of earlier bundles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from imgrec.errors import ModelError
from imgrec.models import (
    ALIASES,
    MODELS,
    ModelConfig,
    build_model,
    describe_models,
    model_config,
    resolve_model_name,
)
from imgrec.models import registry as registry_module

SRC = Path(__file__).resolve().parents[1] / "src" / "imgrec" / "models"

#: (name, in_channels, image_size, extra args) -> the state dict's keys and shapes as the
#: version before timm's interface wrote them (recorded from it): bundles it saved must load.
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in _BN}


def _conv_bn(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.0.weight": (c_out, c_in, 3, 3), **_bn(f"{prefix}.1", c_out)}


def _res(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {**_conv_bn(f"{prefix}.body.0", c, c), **_conv_bn(f"{prefix}.body.1", c, c)}


OLD_KEYS: dict[tuple, dict[str, tuple[int, ...]]] = {
    ("mlp", 1, 28, ()): {
        "classifier.0.weight": (512, 784), "classifier.0.bias": (512,),
        "classifier.3.weight": (10, 512), "classifier.3.bias": (10,)},
    ("cnn", 1, 28, ()): {
        "features.0.weight": (32, 1, 3, 3), "features.0.bias": (32,),
        "features.3.weight": (64, 32, 3, 3), "features.3.bias": (64,),
        "features.6.weight": (64, 64, 3, 3), "features.6.bias": (64,),
        "classifier.0.weight": (64, 576), "classifier.0.bias": (64,),
        "classifier.2.weight": (10, 64), "classifier.2.bias": (10,)},
    ("cifar-cnn", 3, 32, ()): {
        "features.0.weight": (32, 3, 3, 3), "features.0.bias": (32,),
        "features.2.weight": (32, 32, 3, 3), "features.2.bias": (32,),
        "features.6.weight": (64, 32, 3, 3), "features.6.bias": (64,),
        "features.8.weight": (64, 64, 3, 3), "features.8.bias": (64,),
        "classifier.0.weight": (512, 2304), "classifier.0.bias": (512,),
        "classifier.3.weight": (10, 512), "classifier.3.bias": (10,)},
    ("small-cnn", 3, 48, ()): {
        "features.0.weight": (32, 3, 3, 3), "features.0.bias": (32,),
        "features.3.weight": (64, 32, 3, 3), "features.3.bias": (64,),
        "features.6.weight": (128, 64, 3, 3), "features.6.bias": (128,),
        "classifier.0.weight": (256, 2048), "classifier.0.bias": (256,),
        "classifier.3.weight": (10, 256), "classifier.3.bias": (10,)},
    ("fast-cnn", 1, 28, ()): {
        "features.0.weight": (16, 1, 3, 3), **_bn("features.2", 16),
        "features.4.weight": (32, 16, 3, 3), **_bn("features.6", 32),
        "features.8.weight": (64, 32, 3, 3), **_bn("features.9", 64),
        "classifier.weight": (10, 64), "classifier.bias": (10,)},
    ("fast-cnn", 3, 28, (("grid", 3),)): {
        "features.0.weight": (16, 3, 3, 3), **_bn("features.2", 16),
        "features.4.weight": (32, 16, 3, 3), **_bn("features.6", 32),
        "features.8.weight": (64, 32, 3, 3), **_bn("features.9", 64),
        "classifier.weight": (10, 576), "classifier.bias": (10,)},
    ("fast-cnn", 1, 28, (("grid", 3), ("stem", "space-to-depth"), ("stem_width", 32))): {
        "features.1.weight": (32, 4, 3, 3), **_bn("features.2", 32),
        "features.4.weight": (32, 32, 3, 3), **_bn("features.6", 32),
        "features.8.weight": (64, 32, 3, 3), **_bn("features.9", 64),
        "classifier.weight": (10, 576), "classifier.bias": (10,)},
    ("res-cnn", 3, 32, ()): {
        **_conv_bn("features.0", 3, 64), **_conv_bn("features.1", 64, 128),
        **_res("features.3", 128), **_conv_bn("features.4", 128, 256),
        **_conv_bn("features.6", 256, 512), **_res("features.8", 512),
        "classifier.weight": (10, 512), "classifier.bias": (10,)},
}
SCRATCH = ["mlp", "cnn", "cifar-cnn", "small-cnn", "fast-cnn", "res-cnn", "airnet"]


def _build(case: tuple) -> nn.Module:
    name, channels, size, extra = case
    return build_model(name, in_channels=channels, num_classes=10, image_size=size,
                       **dict(extra)).eval()


# -- the registry --------------------------------------------------------------------------
def test_registry_is_a_leaf():
    """registry.py imports no model file and neither torch nor timm at module level, so the
    model files can import it without a cycle."""
    tree = ast.parse((SRC / "registry.py").read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module or ''}"}
            imported |= {f"{'.' * node.level}{a.name}" for a in node.names if not node.module}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm")}
    assert not {m for m in imported if "scratch" in m or "pretrained" in m}
    for name in ("scratch.py", "pretrained.py"):
        assert "register_model" in (SRC / name).read_text()


@pytest.mark.parametrize("first", ["imgrec.models.registry", "imgrec.models.pretrained"])
def test_registry_is_filled_whatever_is_imported_first(first):
    """Importing any module of the package runs its __init__, which imports the model files:
    MODELS is full and in `imgrec models` order however it is reached (a fresh interpreter)."""
    code = (f"import {first}\nfrom imgrec.models.registry import MODELS, build_model\n"
            "print(','.join(MODELS))\nnet = build_model('cnn', in_channels=1, num_classes=2, "
            "image_size=28)\nprint(type(net).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == [",".join(MODELS), "ScratchNet"] and out[0].startswith("mlp,cnn,")


def test_models_listing_and_names():
    rows = describe_models()
    assert [r[0] for r in rows] == [*SCRATCH, "efficientnet_lite0", "efficientnet_lite1",
                                    "efficientnet_lite2", "transfer", "<timm name>",
                                    "<workshop name>"]
    assert dict(rows)["cnn"] == "workshop MNIST CNN: Conv32-Pool-Conv64-Pool-Conv64-Dense64"
    cases = {"imagenet": "efficientnet_lite0", "efficientnet-lite1": "efficientnet_lite1",
             "mobilenet": "mobilenetv2_100", "xception": "legacy_xception", "vgg": "vgg16",
             "Small-CNN": "small-cnn", "res_cnn": "res-cnn", "resnet18": "resnet18"}
    for name, expected in cases.items():
        assert resolve_model_name(name) == expected
    assert ALIASES["cifar_cnn"] == "cifar-cnn"
    with pytest.raises(ModelError) as e:
        resolve_model_name("cnnn")
    assert "did you mean cnn" in e.value.hint
    with pytest.raises(ModelError) as e:
        resolve_model_name("zzzzqqq")
    assert "imgrec models" in e.value.hint


def test_model_configs():
    """One frozen config per model: where its weights come from and which contract factory
    gives its preprocessing."""
    for name in SCRATCH:
        cfg = MODELS[name]
        assert (cfg.weights, cfg.contract, cfg.channels) == ("scratch", "scratch_contract", None)
    assert MODELS["cnn"].default_size == 28 and MODELS["small-cnn"].default_size == 150
    lite = MODELS["efficientnet_lite1"]
    assert (lite.weights, lite.contract, lite.channels, lite.default_size) == \
        ("offline", "lite_contract", 3, 240)
    from imgrec import contract

    assert lite.contract_factory() is contract.lite_contract
    assert MODELS["cnn"].contract_factory() is contract.scratch_contract
    timm_cfg = model_config("resnet18")
    assert (timm_cfg.weights, timm_cfg.contract) == ("timm", "timm_contract")
    assert timm_cfg.builder(num_classes=3).get_classifier().out_features == 3
    with pytest.raises(AttributeError):
        MODELS["cnn"].name = "other"  # frozen
    with pytest.raises(ValueError, match="unknown contract"):
        ModelConfig("x", "x", build_model, contract="nope")


def test_register_model_decorator():
    """timm's pattern: the decorator records the builder and gives it back unchanged."""
    try:
        @registry_module.register_model("tiny-test-net", summary="a test net", default_size=8,
                                        aliases=("tiny_test",))
        def tiny(in_channels: int = 1, num_classes: int = 2, image_size: int = 8):
            return nn.Linear(in_channels * image_size * image_size, num_classes)

        assert callable(tiny) and MODELS["tiny-test-net"].builder is tiny
        assert resolve_model_name("tiny_test") == "tiny-test-net"
        assert build_model("tiny-test-net", num_classes=4).out_features == 4
        with pytest.raises(ValueError, match="registered twice"):
            registry_module.register_model("tiny-test-net", summary="again")(tiny)
    finally:
        MODELS.pop("tiny-test-net", None)
        ALIASES.pop("tiny_test", None)


def test_contract_helpers_are_the_contract_factories():
    import timm
    from timm.data import resolve_data_config

    from imgrec.contract import lite_contract, timm_contract
    from imgrec.models.pretrained import lite_preprocess, timm_preprocess

    assert lite_preprocess("efficientnet_lite1") == lite_contract(240, 274)
    assert lite_preprocess("efficientnet_lite0", 192) == lite_contract(224, 256, 192)
    cfg = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg("resnet18").to_dict())
    assert timm_preprocess("resnet18", 160) == timm_contract(cfg, 160)


# -- timm's interface on imgrec's networks -------------------------------------------------
@pytest.mark.parametrize("case", list(OLD_KEYS), ids=lambda c: f"{c[0]}{dict(c[3]) or ''}")
def test_state_dict_keys_are_those_of_old_bundles(case):
    model = _build(case)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(OLD_KEYS[case]) and shapes == OLD_KEYS[case]
    old = {k: torch.full(s, 0.5) if s else torch.tensor(3) for k, s in OLD_KEYS[case].items()}
    model.load_state_dict(old, strict=True)


@pytest.mark.parametrize("case", list(OLD_KEYS), ids=lambda c: f"{c[0]}{dict(c[3]) or ''}")
def test_scratch_nets_expose_timms_interface(case):
    torch.manual_seed(0)
    model = _build(case)
    name, channels, size, _ = case
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        assert torch.equal(model.forward_head(feats), logits)
        pre = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (2, 10) and pre.shape == (2, model.head_hidden_size)
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear) and clf.out_features == 10
    if name == "mlp":  # a dense net: forward_features is the image, no feature map
        assert feats.shape == x.shape
    else:  # the last conv stage's spatial map, before global pooling or flattening
        assert feats.dim() == 4 and feats.shape[1] == model.num_features
        assert feats.shape[-1] * feats.shape[-2] > 1
    keys = list(model.state_dict())
    model.reset_classifier(4)
    assert list(model.state_dict()) == keys and model(x).shape == (2, 4)
    assert model.get_classifier().out_features == 4 and model.num_classes == 4
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


def test_fast_cnn_grid_pooling_belongs_to_the_head():
    """With grid pooling (MNIST's recipe) forward_features is still the full 7 x 7 map."""
    model = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=28, grid=3)
    feats = model.forward_features(torch.zeros(1, 1, 28, 28))
    assert feats.shape == (1, 64, 7, 7) and model.head_hidden_size == 64 * 9


@pytest.mark.parametrize("size", [28, 27, 9])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_cnn_space_to_depth_stem_fits_any_side(size, depth):
    """The space-to-depth stem folds 2x2 pixel blocks into channels (an odd side repeats its
    last row and column) and gives the same feature-map side as the pooling stem, so the
    grid head is sized right for every image side and depth."""
    x = torch.randn(2, 1, size, size)
    shapes = []
    for stem in ("pool", "space-to-depth"):
        model = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=size,
                            grid=3, depth=depth, stem=stem).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10)
            shapes.append(model.forward_features(x).shape)
    folded = -(-size // 2)
    assert shapes[1][-1] == (folded if depth == 1 else folded // 2 ** (depth - 2))
    assert shapes[0][-1] == size // 2 ** (depth - 1)
    with pytest.raises(ValueError, match="stem"):
        build_model("fast-cnn", in_channels=1, num_classes=10, image_size=28, stem="pixel")


def test_transfer_net_exposes_timms_interface():
    torch.manual_seed(0)
    model = build_model("transfer", backbone="efficientnet_lite0", num_classes=3,
                        image_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 1280, 2, 2) and model.num_features == 1280
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (1, 512)
    assert model.get_classifier() is model.head[-1]
    assert list(model.state_dict())[-4:] == ["head.0.weight", "head.0.bias", "head.3.weight",
                                             "head.3.bias"]


def test_a_grid_as_large_as_the_map_flattens_it_without_pooling():
    """MNIST's recipe (grid 6 on the 24 px crop's 6x6 map): no pooling op at all, and the
    linear layer sees every position of the last map."""
    import torch
    from torch import nn

    from imgrec.models.registry import build_model
    from imgrec.models.scratch import grid_max_pool

    assert isinstance(grid_max_pool(6, 6), nn.Identity)
    net = build_model("fast-cnn", in_channels=1, num_classes=10, image_size=24, width=16,
                      grid=6, stem="space-to-depth", stem_width=16).eval()
    assert net.get_classifier().in_features == 64 * 6 * 6
    x = torch.randn(2, 1, 24, 24)
    assert net.forward_features(x).shape == (2, 64, 6, 6)
    assert torch.allclose(net(x), net.forward_head(net.forward_features(x)))


def test_workshop_names_resolve_are_listed_and_say_when_they_start_from_random_weights():
    """`--model dense` suggested densenet201; `imgrec models` did not list the workshop
    names; vgg16/mobilenet/xception trained from random weights without a word."""
    from types import SimpleNamespace

    from imgrec.models.registry import describe_models, resolve_model_name
    from imgrec.training.runners import _random_backbone

    assert resolve_model_name("dense") == "mlp"
    rows = dict(describe_models())
    assert "vgg = vgg16" in rows["<workshop name>"] and "dense = mlp" in rows["<workshop name>"]

    def plan(model, **cfg):
        options = {"mode": None, "pretrained": False, "weights": None, "model": model, **cfg}
        return SimpleNamespace(module=None, model_name=resolve_model_name(model),
                               cfg=SimpleNamespace(**options))

    assert _random_backbone(plan("vgg16")) and _random_backbone(plan("mobilenet"))
    assert not _random_backbone(plan("vgg16", mode="scratch"))  # asked for it
    assert not _random_backbone(plan("vgg16", weights="vgg16.safetensors"))
    assert not _random_backbone(plan("mlp")) and not _random_backbone(plan("efficientnet_lite0"))
