"""The search space: which TrainConfig options a search varies, over which values.

Each mode has a default space centred on what the recipe would train with (so the recipe's own
point is inside it and is tried first); a small YAML or JSON file overrides it entry by entry:

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log scale)
    epochs: {low: 20, high: 120, step: 10}        # whole numbers: an int range
    head: [linear, mlp]                           # a list: one of these
    label_smoothing: 0.1                          # a single value: fixed, not searched
    weight_decay: null                            # drop it: the recipe decides

Names are TrainConfig fields (the options of `imgrec train`); every value the space can take
is checked against TrainConfig's own limits and validation before any trial runs. Torch-free
except for checking augmentation specs.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import ImgrecError
from ..training.config import TrainConfig, validate
from ..training.recipes import HEAD_DROPOUT, LAYER_DECAY

#: options a search may vary (the rest of TrainConfig may only be fixed)
SEARCHABLE = (
    "model",
    "head",
    "dropout",
    "layer_decay",
    "unfreeze",
    "augment_views",
    "epochs",
    "image_size",
    "batch_size",
    "augment",
    "lr",
    "optimizer",
    "weight_decay",
    "label_smoothing",
    "patience",
    "class_weights",
    "tta",
)
#: options the tuner sets itself (per trial or from its own flags)
RESERVED = ("data", "mode", "out", "resume", "nproc", "quiet", "tensorboard", "onnx", "seed")
#: augmentation from none to strong: with mirror images, and without (digits, text)
FLIP_LADDER = ("none", "flip", "light", "standard", "strong")
PLAIN_LADDER = ("none", "shift=0.05", "digits", "rotation=20,shift=0.15,zoom=0.2")
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    """One searched option: a float or int range (optionally log-scaled or stepped), or a
    list of choices."""

    name: str
    kind: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if self.kind == "int" and (value != int(value) or (value - self.low) % (self.step or 1)):
            return False
        return self.low <= value <= self.high

    def values(self) -> list[Any]:
        """The values every trial's options are checked with: the ends, or each choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        return (
            out | ({"log": True} if self.log else {}) | ({"step": self.step} if self.step else {})
        )


@dataclass
class Space:
    """The searched parameters and the options fixed for every trial."""

    params: dict[str, Param]
    fixed: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"params": {k: p.to_dict() for k, p in self.params.items()}, "fixed": self.fixed}


def default_space(plan: Any) -> dict[str, Param]:
    """The mode's default space, around the recipe's values in `plan` (a RunPlan made with
    no searched option given)."""
    lr, epochs, batch = plan.lr, plan.epochs, plan.batch_size
    common = {
        "lr": Param("lr", "float", lr / 10, min(lr * 5, 1.0), log=True),
        "weight_decay": Param(
            "weight_decay",
            "float",
            1e-5 if plan.mode == "scratch" else 1e-4,
            1e-2 if plan.mode == "scratch" else 1e-1,
            log=True,
        ),
        "label_smoothing": Param("label_smoothing", "float", 0.0, 0.2),
    }
    if plan.mode == "features":  # the head on cached features: epochs cost milliseconds
        return {
            "head": Param("head", "categorical", choices=("linear", "mlp")),
            "dropout": Param("dropout", "float", 0.0, 0.7),  # the mlp head's
            **common,
            "epochs": Param("epochs", "int", max(1, epochs // 4), 2 * epochs),
            "augment_views": Param("augment_views", "int", 0, 2),
        }
    ladder = augment_ladder(plan.augment)
    space = {
        **common,
        "epochs": Param(
            "epochs", "int", max(1, math.ceil(epochs / 2)), max(2, math.ceil(epochs * 1.5))
        ),
        "augment": Param("augment", "categorical", choices=ladder),
    }
    if plan.mode == "finetune":
        return {**space, "head": Param("head", "categorical", choices=("linear", "mlp")),
                "layer_decay": Param("layer_decay", "float", 0.6, 1.0)}
    sizes = tuple(sorted({max(1, batch // 2), batch, batch * 2}))
    return {**space, "batch_size": Param("batch_size", "categorical", choices=sizes)}


def augment_ladder(recipe: Any) -> tuple[str, ...]:
    """Augmentation strengths from none to strong, mirrored or not as the recipe is; the
    recipe's own spec is one of them."""
    from ..augment import Augment

    ladder = FLIP_LADDER if recipe.flip else PLAIN_LADDER
    if any(Augment.parse(a) == recipe for a in ladder):
        return ladder
    return (ladder[0], recipe.describe(), *ladder[1:])


def recipe_point(plan: Any) -> dict[str, Any]:
    """What the recipe trains with, by option name: the search's first trial."""
    from ..augment import Augment

    cfg = plan.cfg
    augment = next(
        (a for a in FLIP_LADDER + PLAIN_LADDER if Augment.parse(a) == plan.augment),
        plan.augment.describe(),
    )
    return {
        "lr": plan.lr,
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "weight_decay": plan.weight_decay,
        "label_smoothing": plan.label_smoothing,
        "optimizer": plan.optimizer,
        "patience": plan.patience,
        "augment": augment,
        "head": cfg.head,
        "dropout": HEAD_DROPOUT if cfg.dropout is None else cfg.dropout,
        "layer_decay": LAYER_DECAY if cfg.layer_decay is None else cfg.layer_decay,
        **({} if cfg.unfreeze is None else {"unfreeze": cfg.unfreeze}),
        "augment_views": cfg.augment_views,
        "model": plan.model_name,
        "image_size": plan.image_size,
        "class_weights": cfg.class_weights,
        "tta": "flip" if "flip" in plan.contract.tta else "none",
    }


# -- the space file ------------------------------------------------------------------------
def read_space_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option name -> range, list, value or null."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ImgrecError(f"--space {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ImgrecError(f"space file {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except Exception as e:  # yaml.YAMLError: its first line says where
        raise ImgrecError(f"space file {path}: not valid YAML ({_first_line(e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ImgrecError(
            f"space file {path}: expected a mapping of option names to ranges, "
            f"lists or values, not a {type(raw).__name__}"
        )
    return raw


def build_space(
    defaults: dict[str, Param],
    raw: dict[str, Any],
    fixed: dict[str, Any],
    where: str = "search space",
) -> Space:
    """The defaults with the file's entries over them, and the options fixed for every
    trial (`fixed`: the caller's, then the file's single values)."""
    check_names(raw, where)
    params = {k: p for k, p in defaults.items() if k not in raw}
    params |= {
        k: parse_param(str(k), v, where) for k, v in raw.items() if isinstance(v, dict | list)
    }
    fixed = {k: v for k, v in fixed.items() if k not in raw} | fixed_values(raw, where)
    return Space({k: p for k, p in params.items() if k not in fixed}, fixed)


def fixed_values(raw: dict[str, Any], where: str = "search space") -> dict[str, Any]:
    """The single values of a space (options fixed for every trial); a number option's
    value in either YAML form (`1e-4`, which YAML 1.1 reads as a string, or `1.0e-4`)."""
    out = {}
    for k, v in raw.items():
        if v is None or isinstance(v, dict | list):
            continue
        kind = _field_kind(str(k))
        out[k] = _coerce(str(k), v, kind, where) if kind in (int, float) else v
    return out


def check_names(raw: dict[str, Any], where: str) -> None:
    """Every name in a space is an option a search may set."""
    for name in raw:
        _check_name(str(name), where)


def _check_name(name: str, where: str) -> None:
    known = [f.name for f in fields(TrainConfig) if f.name not in RESERVED]
    if name in known:
        return
    if name in RESERVED:
        raise ImgrecError(
            f"{where}: {name} cannot be set in a space",
            "imgrec tune sets it (see imgrec tune --help)",
        )
    near = difflib.get_close_matches(name, known, n=1)
    raise ImgrecError(
        f"{where}: unknown parameter {name!r}",
        f"did you mean {near[0]!r}?" if near else f"searchable: {', '.join(SEARCHABLE)}",
    )


def parse_param(name: str, value: dict | list, where: str) -> Param:
    """A list -> choices; {low, high[, log][, step]} -> a range of the option's type (int
    options take whole numbers)."""
    if name not in SEARCHABLE:
        raise ImgrecError(
            f"{where}: {name} can only be fixed (a single value), not searched",
            f"searchable: {', '.join(SEARCHABLE)}",
        )
    kind = _field_kind(name)
    if isinstance(value, list):
        if not value or not all(isinstance(v, str | int | float | bool) for v in value):
            raise ImgrecError(f"{where}: {name}: give a non-empty list of plain values")
        return Param(
            name, "categorical", choices=tuple(_coerce(name, v, kind, where) for v in value)
        )
    extra = set(value) - RANGE_KEYS
    if extra or not {"low", "high"} <= set(value):
        raise ImgrecError(
            f"{where}: {name}: a range is {{low: A, high: B}} with optional "
            f"log: true or step: S" + (f", not {sorted(extra)}" if extra else "")
        )
    if kind not in (int, float):
        raise ImgrecError(f"{where}: {name} takes values, not a range; give a list of them")
    low, high = (_number(name, value[k], where) for k in ("low", "high"))
    step = None if value.get("step") is None else _number(name, value["step"], where)
    log = bool(value.get("log", False))
    _check_range(name, low, high, step, log, where)
    if kind is float:
        return Param(name, "float", low, high, log, step)
    if not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ImgrecError(f"{where}: {name} takes whole numbers")
    return Param(name, "int", int(low), int(high), log, int(step) if step else None)


def _check_range(
    name: str, low: float, high: float, step: float | None, log: bool, where: str
) -> None:
    if not low < high:
        raise ImgrecError(f"{where}: {name}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ImgrecError(f"{where}: {name}: a log range needs low > 0")
    if log and step:
        raise ImgrecError(f"{where}: {name}: a range is either log or stepped, not both")
    if step is not None and step <= 0:
        raise ImgrecError(f"{where}: {name}: step must be positive")


def _field_kind(name: str) -> type:
    hint = get_type_hints(TrainConfig)[name]
    for kind in (bool, int, float, str):
        if hint is kind or kind in getattr(hint, "__args__", ()):
            return kind
    return object


def _number(name: str, value: Any, where: str) -> float:
    """YAML 1.1 reads `1e-4` as a string: numbers in either form are taken."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ImgrecError(f"{where}: {name}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ImgrecError(f"{where}: {name}: {value!r} is not a number")
    return out


def _coerce(name: str, value: Any, kind: type, where: str) -> Any:
    if kind in (int, float) and not isinstance(value, bool):
        number = _number(name, value, where)
        if kind is int and not number.is_integer():
            raise ImgrecError(f"{where}: {name} takes whole numbers, not {value!r}")
        return int(number) if kind is int else number
    if kind is str and not isinstance(value, str):
        raise ImgrecError(f"{where}: {name} takes names, not {value!r}")
    return value


# -- checking every value against TrainConfig -----------------------------------------------
def check_space(space: Space, base: dict[str, Any], where: str = "search space") -> None:
    """Each value the space can give, with the fixed options, passes TrainConfig's limits and
    validation (the same checks `imgrec train` makes), so no trial fails on a bad option."""
    meta = {f.name: f.metadata for f in fields(TrainConfig)}
    for name, value in space.fixed.items():
        _check_value(name, value, meta[name], {**base, **space.fixed}, where)
    for name, param in space.params.items():
        for value in param.values():
            _check_value(name, value, meta[name], {**base, **space.fixed}, where)


def check_fixed(fixed: dict[str, Any], options: dict[str, Any], where: str) -> None:
    """The space's single values, checked before the base plan is made of them: an error
    names the space file and the value (the plan's own named a --flag tune has not)."""
    meta = {f.name: f.metadata for f in fields(TrainConfig)}
    for name, value in fixed.items():
        _check_value(name, value, meta[name], {**options, **fixed}, where)


def _check_value(name: str, value: Any, meta: Any, options: dict[str, Any], where: str) -> None:
    low, high, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    bad = (choices and value not in choices) or (
        isinstance(value, int | float)
        and ((low is not None and value < low) or (high is not None and value > high))
    )
    if bad:
        allowed = ", ".join(choices) if choices else (
            f"from {low} to {high}" if low is not None and high is not None
            else f"at least {low}" if low is not None else f"at most {high}")
        raise ImgrecError(f"{where}: {name}={value!r} is out of range", f"allowed: {allowed}")
    try:
        # the mlp head's dropout is checked with that head (a trial drawing the linear
        # head leaves it out: without_unused)
        head = {"head": "mlp"} if name == "dropout" else {}
        cfg = TrainConfig(**without_unused({"data": "-", **options, **head, name: value}))
        validate(cfg)
        if name == "augment":
            from ..augment import Augment

            Augment.parse(value)
    except TypeError as e:
        raise ImgrecError(f"{where}: {name}={value!r}: {e}") from None
    except ImgrecError as e:
        raise ImgrecError(f"{where}: {name}={value!r}: {e.message}", e.hint) from None


#: options that act only under another option's value (`without_unused` says when): a trial
#: draws them after the others
CONDITIONAL = ("dropout",)


def without_unused(options: dict[str, Any]) -> dict[str, Any]:
    """A trial's options without those its other choices make moot (the mlp head's dropout
    in a trial that drew the linear head), which `imgrec train` refuses."""
    if options.get("head", "linear") == "linear":
        return {k: v for k, v in options.items() if k != "dropout"}
    return options


def _first_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return "; ".join(lines[:3]) or type(e).__name__


def space_record(space: Space) -> dict[str, Any]:
    """The space as plain JSON (tune.json, the study's attributes)."""
    return json.loads(json.dumps(space.to_dict(), default=str))
