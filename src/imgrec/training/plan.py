"""The run plan: what to train, on what data and how, settled once from a TrainConfig (the
recipe fills what the user left open) and frozen. Runners read it and never change it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..augment import Augment
from ..contract import Preprocess, scratch_contract
from ..data.arrays import dataset_from_arrays, dataset_from_torch
from ..data.datasets import Dataset, builtin_key, load_dataset
from ..errors import ImgrecError
from ..files import check_run_folder
from ..models.registry import MODELS, resolve_model_name
from .config import TrainConfig, refuse_finetune_options, validate
from .distributed import SINGLE, World, world_from_env
from .recipes import (
    BUILTIN_RECIPES,
    LONG_WHERE_FAST,
    RECIPES,
    TRANSFER_DEFAULTS,
    other_network_recipe,
    recipe_for,
)
from .threads import cpu_flags

HYPER = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing",
         "patience")


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig
    data: Dataset
    mode: str  # scratch, features or finetune
    model_name: str
    model_args: dict[str, Any]
    contract: Preprocess
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    label_smoothing: float
    patience: int
    augment: Augment
    device: torch.device
    out: Path
    val_fraction: float
    test_fraction: float
    backbone: Any = None  # models.pretrained.Backbone in the transfer modes
    module: Any = None  # a network the caller built (the Python API's model=nn.Module)
    lookahead: bool = False  # airbench's lookahead EMA of the weights (engine.Lookahead)
    fused_optimizer: bool = False  # the recipe's: one fused optimizer kernel a step
    world: World = SINGLE  # torchrun's processes (distributed.py); batch_size is per process
    recipe: str = "short"  # the built-in recipe's variant (recipe_variant)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world.size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.splits["train"]) / self.global_batch)

    @property
    def has_validation(self) -> bool:
        return "val" in self.data.splits and len(self.data.splits["val"]) > 0

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed (not epochs: `--resume --epochs N`
        extends a run)."""
        found = {"data": self.data.fingerprint(), "model": self.model_name,
                 "model_args": self.model_args, "image_size": self.image_size,
                 "batch_size": self.batch_size, **self.recipe_fingerprint()}
        if self.world.active:  # another process count is another run
            found["world_size"] = self.world.size
        return found


    def recipe_fingerprint(self) -> dict:
        """The training options a resumed run must share (another optimizer failed on the
        saved state; another lr or augmentation was recorded for epochs it never ran)."""
        return {"seed": self.cfg.seed, "optimizer": self.optimizer, "lr": self.lr,
                "weight_decay": self.weight_decay, "label_smoothing": self.label_smoothing,
                "augment": self.augment.describe()}


def pick_device(name: str | None = None, world: World = SINGLE) -> torch.device:
    """CUDA when present (or asked for), then Apple's MPS, else the CPU. Under torchrun, a
    CUDA run uses the GPU cuda:LOCAL_RANK."""
    if world.active and name in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    if name:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise ImgrecError(f"--device {name}: not a device", "use --device cpu, cuda, "
                              "cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ImgrecError(f"--device {name}: no CUDA GPU is available", "use --device cpu")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                         and torch.backends.mps.is_available()):
            raise ImgrecError(f"--device {name}: Apple's MPS is not available here",
                              "use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ImgrecError(f"--device {name}: imgrec trains on cpu, cuda or mps",
                              "use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_plan(cfg: TrainConfig, source: Any = None, module: Any = None) -> RunPlan:
    """Settle every choice of a run. `source`: data the caller holds instead of `cfg.data`
    (NumPy arrays `(x, y)` or a torch Dataset); `module`: a network the caller built."""
    validate(cfg)
    if cfg.out:  # an unwritable or foreign --out fails now, not after the data has loaded
        check_run_folder(cfg.out)
    augment_default = Augment.parse(cfg.augment)  # a bad --augment fails before data loads
    key = builtin_key(cfg.data) if source is None else None
    world = world_from_env()
    device = pick_device(cfg.device, world)
    variant = recipe_variant(cfg, key, device)
    recipe = _recipe(cfg, key, variant)
    if key in BUILTIN_RECIPES and _another_network(cfg, module, recipe):
        if cfg.recipe == "long":
            raise ImgrecError(f"--recipe long is {cfg.data}'s recipe for {recipe['model']}; "
                              "another network trains with generic settings",
                              f"drop --recipe, or train --model {recipe['model']}")
        recipe, variant = other_network_recipe(recipe), "network"
    pick = _picker(cfg, recipe)
    ds = _load(cfg, source, pick("val_fraction"), pick("test_fraction"))
    if cfg.exclude:
        from ..label_fixes import exclude_files

        ds = exclude_files(ds, cfg.exclude, quiet=cfg.quiet)
    if key not in BUILTIN_RECIPES:  # folders, CSVs, arrays: by how the data is held
        recipe = recipe_for("memory" if ds.in_memory else "folder")
        pick = _picker(cfg, recipe)
    name, args = _model_choice(cfg, recipe, module)
    size = _image_size(cfg, ds, name)
    mode = _mode(cfg, ds, name, module)
    hyper = {h: pick(h) for h in HYPER}
    augment = Augment.parse(pick("augment")) if cfg.augment is None else augment_default
    backbone, contract = None, _contract(cfg, ds, name, size, pick, recipe)
    if mode != "scratch":
        backbone, contract = _backbone(cfg, name, contract)
        hyper, augment = _transfer_defaults(cfg, mode, hyper, augment)
    size = contract.input_size  # a recipe's crop, or the backbone's own size
    if world.active and cfg.batch_size is None:  # the recipe's batch is the global one
        hyper["batch_size"] = max(1, math.ceil(hyper["batch_size"] / world.size))
    out = Path(cfg.out or Path("runs") / re.sub(r"[^\w.-]+", "-", f"{ds.name}-{name}")).expanduser()
    if not cfg.out:
        check_run_folder(out)
    return RunPlan(cfg, ds, mode, name, args, contract, size, **hyper, augment=augment,
                   device=device, out=out, recipe=variant,
                   val_fraction=pick("val_fraction"), test_fraction=pick("test_fraction"),
                   backbone=backbone, module=module, lookahead=bool(pick("lookahead")),
                   fused_optimizer=bool(recipe.get("fused_optimizer")), world=world)


def recipe_variant(cfg: TrainConfig, key: str | None, device: torch.device,
                   flags: set[str] | None = None) -> str:
    """short or long: --recipe's, else the default for this machine, long for the datasets of
    LONG_WHERE_FAST where bfloat16 runs fast (CUDA; a CPU with AMX, unless --precision fp32),
    short elsewhere."""
    if cfg.recipe in ("short", "long"):
        return cfg.recipe
    if key not in LONG_WHERE_FAST:
        return "short"
    if device.type == "cuda":
        return "long"
    if device.type != "cpu" or cfg.precision == "fp32":
        return "short"
    return "long" if "amx_bf16" in (cpu_flags() if flags is None else flags) else "short"


def _another_network(cfg: TrainConfig, module: Any, recipe: dict[str, Any]) -> bool:
    """Whether the run trains a network other than the one the dataset's recipe was tuned
    for (then it keeps the recipe's data settings and trains as OTHER_NETWORK says)."""
    if module is not None:
        return True
    return bool(cfg.model) and resolve_model_name(cfg.model) != \
        resolve_model_name(recipe["model"])


def _recipe(cfg: TrainConfig, key: str | None, variant: str) -> dict[str, Any]:
    """The dataset's recipe; the long variant is RECIPES['<name>-long']."""
    name = key or cfg.data.lower()
    if variant != "long":
        return recipe_for(name)
    if f"{name}-long" not in RECIPES:
        have = ", ".join(k[:-5] for k in RECIPES if k.endswith("-long"))
        raise ImgrecError(f"--recipe long: there is no long recipe for {cfg.data}",
                          f"long recipes exist for {have}")
    return recipe_for(f"{name}-long")


def _picker(cfg: TrainConfig, recipe: dict[str, Any]):
    """An option's value: the user's when given, else the recipe's."""
    return lambda name: getattr(cfg, name) if getattr(cfg, name) is not None \
        else recipe.get(name)


def _load(cfg: TrainConfig, source: Any, val_fraction: float, test_fraction: float) -> Dataset:
    if source is None:
        return load_dataset(cfg.data, cfg.data_dir, val_fraction=val_fraction,
                            test_fraction=test_fraction, seed=cfg.seed)
    if isinstance(source, tuple) and len(source) != 2:
        raise ImgrecError(f"a tuple of data holds the images and the labels, (x, y): this one "
                          f"has {len(source)} items")
    if isinstance(source, tuple):
        return dataset_from_arrays(source[0], source[1], name=cfg.data,
                                   val_fraction=val_fraction, test_fraction=test_fraction,
                                   seed=cfg.seed)
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return dataset_from_torch(source, name=cfg.data, val_fraction=val_fraction,
                                  test_fraction=test_fraction, seed=cfg.seed)
    raise ImgrecError(f"cannot train on a {type(source).__name__}",
                      "give a dataset name, a folder, a CSV, arrays (x, y) or a torch Dataset")


def _model_choice(cfg: TrainConfig, recipe: dict[str, Any], module: Any):
    if module is not None:
        return f"custom:{type(module).__name__}", {}
    name = resolve_model_name(cfg.model or recipe["model"])
    return name, dict(cfg.model_args or (recipe.get("model_args", {}) if not cfg.model else {}))


def _image_size(cfg: TrainConfig, ds: Dataset, name: str) -> int:
    """--image-size, else in-memory data's own size, else the model's default, else 224."""
    default = MODELS[name].default_size if name in MODELS else 224
    if _pretrained_contract(name):  # the weights' own size, set by their contract
        default = None
    native = ds.native_size if ds.in_memory else None
    return cfg.image_size or native or default or 224


def _pretrained_contract(name: str) -> bool:
    """Whether the registry says this model trains with its pretrained weights' contract
    (the offline EfficientNet-Lite), whatever the data."""
    return name in MODELS and MODELS[name].contract == "lite_contract"


def _mode(cfg: TrainConfig, ds: Dataset, name: str, module: Any) -> str:
    """--mode; auto: a pretrained backbone on colour image files -> features, else scratch."""
    from ..models.pretrained import OFFLINE_WEIGHTS

    files = not ds.in_memory and ds.channels == 3
    pretrained = bool(cfg.pretrained or cfg.weights or name in OFFLINE_WEIGHTS)
    mode = cfg.mode or "auto"
    if mode == "auto":
        mode = "features" if pretrained and files and cfg.model else "scratch"
    if mode == "scratch" and (cfg.pretrained or cfg.weights):  # asked for, and not used
        what = "a built-in array dataset" if ds.in_memory else "not colour image files"
        raise ImgrecError(f"--pretrained/--weights load a backbone for --mode features or "
                          f"finetune, which read colour image files; {ds.name} is {what}",
                          "drop them to train from scratch, or give a folder of colour photos")
    if mode != "scratch" and module is not None:
        raise ImgrecError(f"--mode {mode} takes a pretrained backbone by name, not a module",
                          "give model='efficientnet_lite0' (or another timm name)")
    if mode != "scratch" and not files:
        raise ImgrecError(f"--mode {mode} needs colour image files (a folder or a CSV of paths)",
                          "built-in array datasets train with --mode scratch")
    refuse_finetune_options(cfg, mode)
    return mode


def _contract(cfg: TrainConfig, ds: Dataset, name: str, size: int, pick,
              recipe: dict[str, Any]) -> Preprocess:
    """The preprocessing a new model trains with, recorded in its bundle: the pretrained
    weights' own for EfficientNet-Lite, else by the data; the recipe's framing of custom
    images (MNIST's digit fit) and --tta on top."""
    if _pretrained_contract(name):
        from ..models.pretrained import lite_preprocess

        contract = lite_preprocess(name, size)
    else:
        contract = scratch_contract(ds.channels, size, pick("invert"), ds.in_memory)
    if (pick("tta") or "none") == "flip":
        contract = contract.replace(tta=("flip",))
    if recipe.get("fit"):
        contract = contract.replace(fit=recipe["fit"])
    crop = recipe.get("crop") or 0
    if crop and crop < size and not cfg.image_size and not _pretrained_contract(name):
        # the recipe's centre crop of the data's own size (MNIST: the 24 x 24 its digits
        # occupy), recorded in the contract so predict and serve crop as training did
        contract = contract.replace(resize="shorter", resize_to=size, input_size=crop)
    return contract


def _backbone(cfg: TrainConfig, name: str, contract: Preprocess):
    """The transfer modes' backbone (where its weights come from, checked up front) and its
    pixels; the data's framing (fit, invert) and --tta are kept."""
    from ..models.pretrained import resolve_backbone

    backbone = resolve_backbone(name, cfg.pretrained, cfg.weights, cfg.image_size)
    return backbone, backbone.contract.replace(tta=tuple(contract.tta), fit=contract.fit,
                                               invert=contract.invert)


def _transfer_defaults(cfg: TrainConfig, mode: str, hyper: dict[str, Any], augment: Augment):
    """The transfer modes' own defaults where the user gave none (recipes.TRANSFER_DEFAULTS)."""
    defaults = TRANSFER_DEFAULTS[mode]
    hyper = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else defaults.get(k, v))
             for k, v in hyper.items()}
    if cfg.optimizer is None:
        hyper["optimizer"] = "adamw"
    if cfg.augment is None:
        augment = Augment.parse(defaults["augment"])
    if cfg.augment_views and not augment.active:
        raise ImgrecError("--augment-views needs an augmentation to draw the views from",
                          "drop --augment none, or give e.g. --augment standard")
    if mode == "features" and cfg.augment is not None and augment.active \
            and not cfg.augment_views:  # it was recorded as none, and nothing said so
        raise ImgrecError("--augment in features mode draws --augment-views K views of each "
                          "training image (their features are cached); without them it does "
                          "nothing", "add --augment-views 4, or leave --augment out")
    return hyper, augment
