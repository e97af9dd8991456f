"""TrainConfig: the one list of training options.

The Python API takes these as keyword arguments (`imgrec.train("mnist", epochs=3)`) and the
command line builds `imgrec train`'s options from the same fields (help, limits and choices
are in each field's metadata), so the two never drift apart. Torch-free: the CLI imports it
to build --help quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ImgrecError

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
MODES = ("auto", "scratch", "features", "finetune")
HEADS = ("linear", "mlp")
CLASS_WEIGHTS = ("auto", "balanced", "none")
INVERT = ("auto", "yes", "no")
RECIPE_VARIANTS = ("default", "short", "long")
PRECISIONS = ("auto", "fp32", "bf16")


def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (),
           min: float | None = None, max: float | None = None,
           choices: tuple[str, ...] | None = None, cli: bool = True, factory: Any = None) -> Any:
    """A TrainConfig field with what the command line needs to offer it."""
    meta = {"help": help, "flags": flags, "min": min, "max": max, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a run is asked to do. None means 'the recipe decides' (training/recipes.py).
    Fields follow `imgrec train`'s option order."""

    data: str = field(metadata={"help": "mnist, fashion-mnist, cifar10, a folder or a CSV",
                                "argument": True})
    model: str | None = option(None, "registry or timm name (default: the dataset's recipe); "
                                     "see `imgrec models`")
    recipe: str | None = option(
        None, "the built-in dataset's recipe: default (the one that fits a laptop's time on "
              "this machine: cifar10 runs long where bfloat16 is fast, on GPUs and CPUs with "
              "AMX, else short), short, or long (the best accuracy; cifar10)",
        choices=RECIPE_VARIANTS)
    mode: str | None = option(
        None, "scratch: all weights from random init; features: frozen pretrained backbone, "
              "cached features, new head; finetune: head warm-up then unfreeze (default: "
              "features for a pretrained --model on an image folder, else scratch)",
        choices=("scratch", "features", "finetune"))
    pretrained: bool = option(False, "ImageNet weights for a timm --model from timm's hub",
                              flags=("--pretrained",))
    weights: str | None = option(None, "local .safetensors or .pth state dict for --model "
                                       "(loaded without pickle)")
    head: str = option("linear", "transfer head: linear, or mlp (dense + dropout)",
                       choices=HEADS)
    dropout: float | None = option(None, "the mlp head's dropout rate (default 0.5; the "
                                         "linear head has none)", min=0.0, max=0.95)
    layer_decay: float | None = option(
        None, "finetune: each backbone block's lr is this times the one above it, from the "
              "head down (default 0.85; 1: one lr for every layer)", min=0.05, max=1.0)
    unfreeze: int | None = option(
        None, "finetune: train only the backbone's last N layer groups (the blocks "
              "--layer-decay counts; Lite0 has 17) and the head, the rest frozen (default: all)",
        min=1)
    augment_views: int = option(0, "features mode: K augmented views per training image "
                                   "(cached)", min=0, max=64)
    epochs: int | None = option(None, "epochs (default: recipe)", min=1)
    image_size: int | None = option(None, "input side in pixels", min=8, max=1024)
    batch_size: int | None = option(None, "", min=1)
    augment: str | None = option(
        None, "preset (none, flip, light, digits, standard, strong) and/or key=value list: "
              "rotation=DEG, shift=F, width_shift=F, height_shift=F, zoom=F, flip, "
              "brightness=F, crop=PIXELS; e.g. 'standard,zoom=0.3'")
    exclude: str | None = option(None, "leave out the image files this list names: a fix "
                                       "list CSV (imgrec doctor --labels --fix-list) or one "
                                       "path per line, relative to DATA or absolute")
    out: str | None = option(None, "bundle folder (default runs/DATA-MODEL)")
    seed: int = option(0, "seed for splits, init and shuffling")
    lr: float | None = option(None, "peak learning rate (one-cycle)")
    optimizer: str | None = option(None, "", choices=OPTIMIZERS)
    weight_decay: float | None = option(None, "", min=0.0)
    label_smoothing: float | None = option(None, "", min=0.0, max=0.99)
    patience: int | None = option(None, "early-stop patience in epochs (0: off); the best "
                                        "epoch is restored", min=0)
    val_fraction: float | None = option(None, "validation share carved from train when there "
                                              "is none", min=0.0, max=0.89)
    test_fraction: float | None = option(None, cli=False)
    class_weights: str = option("auto", "auto: balance the loss when classes are imbalanced",
                                choices=CLASS_WEIGHTS)
    invert: str | None = option(None, "recorded in the contract: invert dark-on-light inputs "
                                      "(MNIST-style)", choices=INVERT)
    tta: str | None = option(None, "test-time augmentation recorded in the contract: flip "
                                   "(average the image and its mirror) or none (default: the "
                                   "recipe's)")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    data_dir: str | None = option(None, "root of built-in datasets (else $IMGREC_DATA)")
    workers: int | None = option(None, "image decoding processes", min=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, mps (default: best)")
    precision: str = option(
        "auto", "auto: bfloat16 autocast on CUDA and on CPUs with AMX (where it is faster), "
                "else float32; bf16 forces it where the CPU supports bfloat16", choices=PRECISIONS)
    sync_bn: bool = option(False, "distributed (torchrun) on CUDA: synchronise BatchNorm "
                                  "statistics across processes (SyncBatchNorm)",
                           flags=("--sync-bn",))
    nproc: int | None = option(None, "start N training processes on this machine with "
                                     "torchrun (distributed data-parallel; --batch-size is "
                                     "per process)", min=1)
    lookahead: bool | None = option(None, "average the weights along the run (airbench's "
                                          "lookahead EMA); the averaged weights are saved",
                                    cli=False)
    tensorboard: bool = option(True, "write TensorBoard scalars")
    onnx: bool = option(True, "write model.onnx into the bundle at the end (checked against "
                              "PyTorch); --no-onnx leaves it to `imgrec export` (imgrec tune's "
                              "trials skip it)")
    quiet: bool = option(False, "no progress output", flags=("--quiet", "-q"))
    model_args: dict[str, Any] = option(cli=False, factory=dict)


def cli_fields() -> list:
    """The TrainConfig fields `imgrec train` offers, in order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli", True)]


def config_argv(options: dict[str, Any]) -> list[str]:
    """`imgrec train`'s arguments again from parsed options (what the CLI gives TrainConfig):
    the command each process of `--nproc N` runs."""
    argv = [str(options["data"])]
    for f in cli_fields():
        value = options.get(f.name, f.default)
        if f.metadata.get("argument") or value == f.default or f.name == "nproc":
            continue
        flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        else:
            argv += [flag, str(value)]
    return argv


def _check_numbers(cfg: TrainConfig) -> None:
    """Numeric options are numbers (a YAML space's `lr: "abc"`, the Python API's
    `epochs="two"` or `batch_size=3.5` failed inside a comparison or a range())."""
    import numbers
    import typing

    for name, hint in typing.get_type_hints(TrainConfig).items():
        wanted = {int, float} & set(typing.get_args(hint) or (hint,))
        value = getattr(cfg, name)
        if not wanted or value is None:
            continue
        whole = wanted == {int}
        kind = numbers.Integral if whole else numbers.Real  # NumPy's numbers too
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise ImgrecError(f"{flag} must be {'a whole number' if whole else 'a number'}, not "
                              f"{value!r}")
        if type(value) not in (int, float):  # np.int64(5): JSON cannot write it (bundle, record)
            setattr(cfg, name, int(value) if whole else float(value))


def validate(cfg: TrainConfig) -> None:
    """Reject bad options with one clear line before any data is read (the CLI's limits
    already stop most of them; the Python API relies on this)."""
    _check_numbers(cfg)
    checks = [
        (cfg.epochs is not None and cfg.epochs < 1, "--epochs must be at least 1"),
        (cfg.batch_size is not None and cfg.batch_size < 1, "--batch-size must be at least 1"),
        (cfg.image_size is not None and not 8 <= cfg.image_size <= 1024,
         "--image-size must be between 8 and 1024"),
        (cfg.lr is not None and not 0 < cfg.lr < 10, "--lr must be a positive number below 10"),
        (cfg.optimizer is not None and cfg.optimizer not in OPTIMIZERS,
         f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 0.9,
         "--val-fraction must be in [0, 0.9)"),
        (cfg.weight_decay is not None and not 0 <= cfg.weight_decay <= 10,
         "--weight-decay must be a number from 0 to 10"),
        (cfg.label_smoothing is not None and not 0 <= cfg.label_smoothing < 1,
         "--label-smoothing must be in [0, 1)"),
        (cfg.class_weights not in CLASS_WEIGHTS,
         "--class-weights must be auto, balanced or none"),
        (cfg.invert not in (None, *INVERT), "--invert must be auto, yes or no"),
        (cfg.tta not in (None, "none", "flip"), f"--tta must be none or flip, not {cfg.tta!r}"),
        (cfg.recipe not in (None, *RECIPE_VARIANTS), "--recipe must be default, short or long"),
        (cfg.precision not in PRECISIONS, "--precision must be auto, fp32 or bf16"),
        (cfg.augment_views < 0 or cfg.augment_views > 64,
         "--augment-views must be between 0 and 64"),
        (not 0 <= cfg.seed < 2**32, "--seed must be a whole number from 0 to 4294967295"),
        (cfg.nproc is not None, "nproc launches torchrun from the command line (imgrec train "
                                "--nproc N); from Python, start your script with torchrun"),
    ]
    for bad, message in checks:
        if bad:
            raise ImgrecError(message)
    _validate_transfer(cfg)


def _validate_transfer(cfg: TrainConfig) -> None:
    if (cfg.mode or "auto") not in MODES:
        raise ImgrecError(f"unknown --mode {cfg.mode!r}", f"choose one of {', '.join(MODES)}")
    if cfg.head not in HEADS:
        raise ImgrecError(f"unknown --head {cfg.head!r}", "use --head linear or --head mlp")
    if cfg.pretrained and cfg.weights:
        raise ImgrecError("--pretrained and --weights both give the backbone's weights",
                          "give one of them")
    if cfg.mode == "scratch" and (cfg.pretrained or cfg.weights):
        raise ImgrecError("--mode scratch trains from random weights; --pretrained/--weights "
                          "need a transfer mode", "use --mode features or --mode finetune")
    if cfg.mode in ("features", "finetune") and not cfg.model:
        raise ImgrecError(f"--mode {cfg.mode} needs a pretrained backbone",
                          "add --model efficientnet_lite0 (offline ImageNet weights)")
    if cfg.mode is not None:
        refuse_finetune_options(cfg, cfg.mode)


def refuse_finetune_options(cfg: TrainConfig, mode: str) -> None:
    """Options that shape another mode than this run's are refused in one line instead of
    being ignored: --unfreeze and --layer-decay (finetune), --head, --dropout and
    --augment-views (a transfer head), --optimizer and --resume (not features mode, whose
    head trains in seconds with AdamW)."""
    given = [f"--{n.replace('_', '-')}" for n in ("unfreeze", "layer_decay")
             if getattr(cfg, n) is not None]
    if given and mode != "finetune":
        why = "its backbone stays frozen" if mode == "features" else "it has no backbone"
        verb = "apply" if len(given) > 1 else "applies"
        raise ImgrecError(f"{' and '.join(given)} only {verb} to --mode finetune (this run is "
                          f"{mode}: {why})", "add --mode finetune, or leave them out")
    head = [flag for flag, given in (("--head mlp", cfg.head != "linear"),
                                     ("--dropout", cfg.dropout is not None),
                                     ("--augment-views", cfg.augment_views > 0)) if given]
    if head and mode == "scratch":
        raise ImgrecError(f"{' and '.join(head)}: a scratch network has no transfer head",
                          "use them with --mode features or finetune, or leave them out")
    if cfg.dropout is not None and cfg.head == "linear" and mode != "scratch":
        raise ImgrecError("--dropout is the mlp head's; the linear head has none",
                          "add --head mlp, or leave --dropout out")
    if mode == "features" and (cfg.optimizer is not None or cfg.resume):
        flag = "--optimizer" if cfg.optimizer is not None else "--resume"
        raise ImgrecError(f"{flag} does not apply to --mode features: its head trains in "
                          "seconds with AdamW on cached features", "leave it out")
