"""The search: Optuna's TPE proposes TrainConfig options, each trial is an ordinary training
run (training.api.plan + runners.run_plan) with one callback that reports the validation
metric each epoch and stops the run when the pruner says so; the best trial is retrained as
an ordinary bundle in OUT/best.

Trials see the training and validation splits only: the test split is removed from each
trial's plan, so no trial scores (or, in features mode, even embeds) a test image. The final
bundle is the one run that has it, and its test metrics are the search's only look at it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ImgrecError
from . import study as st
from .space import (
    CONDITIONAL,
    build_space,
    check_space,
    default_space,
    read_space_file,
    recipe_point,
    without_unused,
)

VALIDATION_FRACTION = 0.1  # held out of train when the data has no validation split


@dataclass
class TuneSettings:
    """What `imgrec tune` / `imgrec.tune(...)` is asked to do."""

    data: Any
    model: str | None = None
    mode: str | None = None
    trials: int = 20  # finished (complete or pruned) trials the study should hold
    timeout: float | None = None  # seconds for this process's trials
    study: str | None = None
    storage: str | None = None
    space: str | Path | dict | None = None  # a space file, or the same mapping
    metric: str = "val_accuracy"
    out: str | Path | None = None
    pruner: str = "median"
    subset: int | None = None  # training images each trial (and the final bundle) uses
    seed: int = 0  # every trial's training seed (trials differ only by their options)
    sampler_seed: int | None = None
    heartbeat: int = 30
    keep_trials: bool = False
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig options fixed

    def check(self) -> None:
        checks = [
            (self.metric not in st.METRICS, f"--metric must be {' or '.join(st.METRICS)}"),
            (self.pruner not in st.PRUNERS, f"--pruner must be {', '.join(st.PRUNERS)}"),
            (self.trials < 1, "--trials must be at least 1"),
            (self.timeout is not None and self.timeout <= 0, "--timeout must be positive"),
            (self.heartbeat < 1, "--heartbeat must be at least 1 second"),
            (self.subset is not None and self.subset < 2, "--subset must be at least 2"),
        ]
        for bad, message in checks:
            if bad:
                raise ImgrecError(message)

    @property
    def data_name(self) -> str:
        if isinstance(self.data, str | Path):
            return Path(str(self.data)).name or str(self.data)
        return "arrays" if isinstance(self.data, tuple) else "dataset"

    def folder(self) -> Path:
        name = f"tune-{self.data_name}" + (f"-{self.model}" if self.model else "")
        return Path(self.out or Path("runs") / name).expanduser()

    def study_name(self, mode: str, model: str) -> str:
        return self.study or f"{self.data_name}-{model}-{mode}"


@dataclass
class TuneSummary:
    """What a search found (also written to OUT/tune.json)."""

    study: str
    storage: str
    out: str
    metric: str
    direction: str
    mode: str
    model: str
    trials: dict[str, int]  # the study's trials by state
    ran_here: int  # trials this process ran
    seconds: float
    space: dict[str, Any]
    best: dict[str, Any] | None  # trial, value, params, best_epoch
    recipe: dict[str, Any] | None  # the recipe's own point (trial 0 of a new study)
    bundle: str | None = None
    validation: dict[str, Any] | None = None  # the final bundle's validation figures
    test: dict[str, Any] | None = None
    test_note: str = ""
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class TrialReporter:
    """The training callback of one trial: reports the validation metric each epoch to the
    Optuna trial and stops the run when the pruner says so; at the end it reads the value of
    the epoch the run kept (restore-best)."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.key = trial, st.METRICS[metric][0]
        self.pruned_at: int | None = None
        self.value: float | None = None
        self.best_epoch: int | None = None
        self.best: dict[str, Any] | None = None  # epoch, val_acc, val_loss of the kept epoch

    def on_epoch_end(self, state: Any, epoch: int, row: dict[str, Any]) -> None:
        if state.stage == "head" and state.plan.mode != "features":  # finetune's warm-up
            return
        if self.trial is None or self.key not in row or self.pruned_at is not None:
            return
        self.trial.report(float(row[self.key]), epoch)
        # after the last epoch there is nothing left to save: a pruned verdict would only
        # throw away a finished run's score (the trial stays complete, its value counts)
        if epoch < state.epochs and self.trial.should_prune():
            self.pruned_at = epoch
            state.stop(f"pruned by the tuner at epoch {epoch}")

    def on_train_end(self, state: Any, logs: dict[str, Any]) -> None:
        best = state.tracker.best if state.tracker is not None else None
        if best is not None and best["state"] is not None:
            self.best = {
                "epoch": int(best["epoch"]),
                "val_acc": float(best["acc"]),
                "val_loss": float(best["loss"]),
            }
            self.value, self.best_epoch = self.best[self.key], self.best["epoch"]


def trial_data(ds: Any, subset: int | None, seed: int, test: bool) -> Any:
    """The dataset a trial sees: without its test split (`test=False`), and with a stratified,
    seeded `subset` of its training images."""
    from ..data.datasets import stratified_split

    splits = {k: v for k, v in ds.splits.items() if test or k != "test"}
    train = splits["train"]
    if subset and subset < len(train):
        _, held = stratified_split(train.labels, subset / len(train), seed)
        splits["train"] = train.subset(held)
    return replace(ds, splits=splits)


class Search:
    """One process's part of a search: settle the space, open the study, run trials, and
    write the outputs."""

    def __init__(self, settings: TuneSettings):
        settings.check()
        self.s = settings
        self.out = settings.folder()
        self.raw = _raw_space(settings.space)
        self.notes: list[str] = []
        self.t0 = time.time()
        self.ran = 0

    def log(self, message: str) -> None:
        if not self.s.quiet:
            print(message, file=sys.stderr, flush=True)

    # -- settling the space ----------------------------------------------------------------
    def prepare(self) -> None:
        """The base plan (what the recipe would train), the space around it, checked."""
        from ..files import check_output_folder
        from .space import check_fixed, check_names, fixed_values

        check_output_folder(self.out, "--out")
        _check_tune_folder(self.out)
        named = isinstance(self.s.space, str | Path)
        self.where = f"space file {self.s.space}" if named else "search space"
        check_names(self.raw, self.where)
        if "model" in self.raw and self.s.model:
            raise ImgrecError(f"{self.where} sets model, and so does --model: give one of them")
        fixed = fixed_values(self.raw, self.where)
        given = {**self.s.options, **fixed}
        check_fixed(fixed, self.s.options, self.where)
        base, extra = self.plan(given), {}
        if not base.has_validation:
            if given.get("val_fraction") is not None:
                raise ImgrecError(
                    "a search needs a validation split: val_fraction 0 leaves none",
                    "drop val_fraction from the space",
                )
            extra = {"val_fraction": VALIDATION_FRACTION}
            self.notes.append(
                f"no validation split in {self.s.data_name}: "
                f"{VALIDATION_FRACTION:.0%} of train is held out for it"
            )
            base = self.plan({**given, **extra})
        self.base, self.mode, self.model = base, base.mode, base.model_name
        self.space = build_space(
            default_space(base), self.raw, {**self.s.options, **extra}, self.where
        )
        if not self.space.params:
            raise ImgrecError(f"{self.where}: nothing left to search (every option is fixed)")
        check_space(self.space, {"model": self.s.model, "mode": self.s.mode}, self.where)

    def plan(self, options: dict[str, Any], out: Path | None = None) -> Any:
        from ..training.api import plan

        options = {
            "mode": self.s.mode,
            "seed": self.s.seed,
            "quiet": True,
            "tensorboard": False,
            **options,
        }
        model = options.pop("model", self.s.model)
        return plan(self.s.data, model, out=str(out or self.out / "best"), **options)

    # -- the study -------------------------------------------------------------------------
    def open(self) -> Any:
        self._check_same_study()
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.url = self.s.storage or st.default_storage(self.out)
        try:
            storage = st.open_storage(self.url, self.s.heartbeat)
        except ImgrecError:
            if created:  # a search that never started leaves nothing behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        warmup = 10 if self.mode == "features" else 2  # head epochs are many and cheap
        identity = {
            "dataset": self.base.data.name,
            "mode": self.mode,
            "model": self.model,
            "metric": self.s.metric,
            # trials on another subset or seed are not comparable: a resumed search with
            # either changed mixed them in one study and crowned the odd one best
            "subset": self.s.subset,
            "seed": self.s.seed,
        }
        self.study = st.open_study(
            self.s.study_name(self.mode, self.model),
            storage,
            self.s.metric,
            st.make_sampler(self.s.sampler_seed, self.s.trials),
            st.make_pruner(self.s.pruner, warmup),
            identity,
        )
        st.fail_stale(self.study)
        if not self.study.get_trials(deepcopy=False):  # a new study tries the recipe first
            point = recipe_point(self.base)
            first = {
                k: point[k]
                for k, p in self.space.params.items()
                if k in point and p.contains(point[k])
            }
            with st.quiet_optuna():
                self.study.enqueue_trial(first, user_attrs={"recipe": True}, skip_if_exists=True)
        return self.study

    def _check_same_study(self) -> None:
        """One --out, one search: another study's run would replace its best/, tune.json and
        trials.csv without a word (they flip-flopped between two studies)."""
        name = self.s.study_name(self.mode, self.model)
        try:
            previous = json.loads((self.out / "tune.json").read_text()).get("study")
        except (OSError, ValueError, AttributeError):
            return
        if previous and previous != name:
            raise ImgrecError(
                f"--out {self.out} holds the search {previous!r}; this one is {name!r}",
                "give this search its own --out",
            )

    def run(self) -> None:
        """Trials until the study holds `trials` finished ones (whichever process ran them),
        or this process's `timeout` is spent."""
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        left = self.s.trials - st.counts(self.study)["finished"]
        if left <= 0:
            self.log(
                f"study {self.study.study_name} already holds {self.s.trials} finished "
                "trials: nothing to run (raise --trials to search further)"
            )
            return
        done = MaxTrialsCallback(self.s.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
        with st.quiet_optuna():
            self.study.optimize(
                self.objective,
                n_trials=left,
                timeout=self.s.timeout,
                callbacks=[done, self.progress],
            )
        st.fail_stale(self.study)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's point, define-by-run: an option its other choices make moot (the mlp
        head's dropout when the trial drew the linear head) is not drawn at all, so the
        sampler models it only where it acts and trials.csv leaves it blank there."""
        names = self.space.params
        params = {k: names[k].suggest(trial) for k in names if k not in CONDITIONAL}
        for k in (k for k in names if k in CONDITIONAL):
            if k in without_unused({**self.space.fixed, **params, k: None}):
                params[k] = names[k].suggest(trial)
        return params

    def objective(self, trial: Any) -> float:
        import optuna

        from ..errors import Terminated
        from ..training.runners import run_plan

        params = self.suggest(trial)
        folder = self.out / "trials" / str(trial.number)
        p = self.plan(without_unused({**self.space.fixed, **params, "onnx": False}), folder)
        p = replace(p, data=trial_data(p.data, self.s.subset, self.s.seed, test=False))
        reporter = TrialReporter(trial, self.s.metric)
        try:
            result = run_plan(p, [reporter], report_skipped=False)
        except BaseException:  # Ctrl-C, a full disk...: the search stops; the point waits
            requeue(trial)
            raise
        finally:
            if not self.s.keep_trials:
                shutil.rmtree(folder, ignore_errors=True)
        self.ran += 1
        if result.interrupted:  # Ctrl-C / SIGTERM: the trial fails and the search ends
            requeue(trial)
            raise Terminated() if result.terminated else KeyboardInterrupt()
        _record(trial, result, reporter)
        if reporter.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {reporter.pruned_at}")
        if reporter.value is None:
            raise ImgrecError("a trial ended without a validation score")
        return reporter.value

    def progress(self, study: Any, trial: Any) -> None:
        """One line per trial this process ran."""
        how = (
            f"pruned at epoch {trial.user_attrs.get('pruned_at')}"
            if trial.state.name == "PRUNED"
            else trial.state.name.lower()
        )
        value = trial.value if trial.value is not None else trial.user_attrs.get("last_value")
        shown = f"{self.s.metric} {value:.4f}" if value is not None else ""
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        secs = trial.duration.total_seconds() if trial.duration else 0.0
        self.log(f"trial {trial.number:<3} {how:<19} {shown}  {params}  ({secs:.1f}s)")


#: what makes a folder a search's own (a later run tops it up)
TUNE_MARKERS = ("study.db", "tune.json", "trials", "best")


def requeue(trial: Any) -> None:
    """A trial that stopped the search (Ctrl-C, SIGTERM, a full disk) fails, and its point
    is queued again, so the search resumed with the same command runs it first: the recipe's
    own point, the first trial of every search, is never lost."""
    with st.quiet_optuna():
        trial.study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs))


def _check_tune_folder(out: Path) -> None:
    """--out: new, empty, or a search's own; a folder of other files is refused before
    anything is written (as `imgrec train --out` refuses one)."""
    if not out.is_dir() or any((out / name).exists() for name in TUNE_MARKERS):
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        raise ImgrecError(f"--out {out} is not empty and holds no search ({', '.join(others[:3])}"
                          f"{' ...' if len(others) > 3 else ''})",
                          "give --out a new or empty folder, or the folder of an earlier search")


def _record(trial: Any, result: Any, reporter: TrialReporter) -> None:
    """What a trial's run tells about itself, kept in the study (and trials.csv)."""
    attrs = {
        "epochs_run": len(result.history),
        "best_epoch": reporter.best_epoch,
        "pruned_at": reporter.pruned_at,
        "train_seconds": round(result.seconds, 1),
    }
    if result.history:
        key = reporter.key
        attrs["last_value"] = result.history[-1].get(key)
    training = result.bundle.training if result.bundle is not None else {}
    for key in ("features_computed", "features_cached"):
        if key in training:
            attrs[key] = training[key]
    for k, v in attrs.items():
        if v is not None:
            trial.set_user_attr(k, v)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _raw_space(space: Any) -> dict[str, Any]:
    if space is None:
        return {}
    if isinstance(space, dict):
        return dict(space)
    return read_space_file(space)
