"""What a search leaves in OUT: the best trial retrained as an ordinary bundle (OUT/best, the
only run that sees the test split), trials.csv, the figures and tune.json. Processes sharing
OUT take turns here (a lock on OUT); one that finds OUT/best already made from the study's
best trial keeps it."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..bundle import atomic_write_text
from ..errors import BundleError, ImgrecError
from . import study as st
from .plots import draw_plots
from .search import Search, TrialReporter, TuneSummary, trial_data
from .space import space_record

LOCK_WAIT_S = 600


@contextmanager
def turn(out: Path):
    """OUT's lock, waited for (another process of the study may be writing its outputs)."""
    from ..files import FolderLock

    deadline = time.time() + LOCK_WAIT_S
    while True:
        try:
            lock = FolderLock(out).acquire()
            break
        except ImgrecError:
            if time.time() > deadline:
                raise
            time.sleep(1.0)
    try:
        yield
    finally:
        lock.release()


def finish(search: Search) -> TuneSummary:
    """trials.csv, the figures, OUT/best and tune.json, from the study as it is now."""
    study, out = search.study, search.out
    with turn(out):
        files = [write_trials_csv(study, out)]
        plots, notes = draw_plots(study, out, search.s.metric)
        files += plots
        summary = _summary(search, [str(f) for f in files], search.notes + notes)
        best = _best_trial(study)
        if best is not None:
            _final_bundle(search, best, summary)
        else:
            summary.test_note = "no trial finished with a score: no bundle was written"
        _tidy(out / "trials", study, search.s.keep_trials)
        summary.seconds = round(time.time() - search.t0, 1)
        path = out / "tune.json"
        summary.files.append(str(path))
        atomic_write_text(path, json.dumps(summary.to_dict(), indent=2, default=str) + "\n")
    return summary


def _tidy(folder: Path, study: Any, keep: bool) -> None:
    """The folders of trials that no process is running (a killed process leaves its own),
    then OUT/trials once empty; --keep-trials keeps them all."""
    if not folder.is_dir() or keep:
        return
    running = {str(t.number) for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    for sub in folder.iterdir():
        if sub.is_dir() and sub.name not in running:
            shutil.rmtree(sub, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:  # another process's trial is running there
        pass


def write_trials_csv(study: Any, out: Path) -> Path:
    """Optuna's trials_dataframe: number, value, state, params_*, user_attrs_*, times."""
    with st.quiet_optuna():
        frame = study.trials_dataframe()
    drop = [c for c in frame.columns if c.startswith("system_attrs")]
    path = out / "trials.csv"
    atomic_write_text(path, frame.drop(columns=drop).to_csv(index=False))
    return path


def _best_trial(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _summary(search: Search, files: list[str], notes: list[str]) -> TuneSummary:
    study, s = search.study, search.s
    recipe = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("recipe") and t.value is not None
        ),
        None,
    )
    best = _best_trial(study)
    return TuneSummary(
        study=study.study_name,
        storage=st.shown(search.url),
        out=str(search.out),
        metric=s.metric,
        direction=st.METRICS[s.metric][1],
        mode=search.mode,
        model=search.model,
        trials=st.counts(study),
        ran_here=search.ran,
        seconds=round(time.time() - search.t0, 1),
        space=space_record(search.space),
        best=None
        if best is None
        else {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "best_epoch": best.user_attrs.get("best_epoch"),
        },
        recipe=None
        if recipe is None
        else {"trial": recipe.number, "value": recipe.value, "params": recipe.params},
        files=files,
        notes=notes,
    )


def _final_bundle(search: Search, best: Any, summary: TuneSummary) -> None:
    """The best trial's options trained once more, with the test split, into OUT/best (kept
    when it is already that trial's bundle)."""
    from ..bundle import read_bundle

    target = search.out / "best"
    record = _tune_record(target)
    bundle = None
    if record.get("study") == search.study.study_name and record.get("trial") == best.number:
        try:
            bundle = read_bundle(target, need_weights=True)
            search.log(f"best    trial {best.number}'s bundle is already in {target}")
        except BundleError as e:  # damaged since: made again, not kept
            search.log(f"best    {target} is damaged ({e.message}): training it again")
    if bundle is None:
        search.log(
            f"best    trial {best.number}: training its bundle in {target} (with the "
            "test split, its only use)"
        )
        bundle, reporter = _retrain(search, best, target)
        summary.validation = reporter.best
        bundle.training["tune"] = {
            "study": search.study.study_name,
            "storage": st.shown(search.url),
            "trial": best.number,
            "metric": search.s.metric,
            "value": best.value,
            "params": best.params,
            "trials": st.counts(search.study),
            "subset": search.s.subset,
            "validation": reporter.best,
            "test_split": "used once, by this bundle"
            if "test" in bundle.training["splits"]
            else "none",
        }
        bundle.write_meta()
    summary.bundle = str(target)
    summary.validation = summary.validation or bundle.training.get("tune", {}).get("validation")
    summary.test = (bundle.metrics or {}).get("test")
    summary.test_note = _test_note(bundle, search.s.data_name)


def _retrain(search: Search, best: Any, target: Path) -> tuple[Any, TrialReporter]:
    from ..training.runners import run_plan
    from .space import without_unused

    shutil.rmtree(target, ignore_errors=True)  # a new best replaces the old bundle whole
    p = search.plan(without_unused({**search.space.fixed, **best.params, "tensorboard": True}),
                    target)
    p = replace(p, data=trial_data(p.data, search.s.subset, search.s.seed, test=True))
    reporter = TrialReporter(None, search.s.metric)
    result = run_plan(p, [reporter])
    if result.interrupted:
        raise KeyboardInterrupt
    return result.bundle, reporter


def _tune_record(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "imgrec.json").read_text())
        return meta.get("training", {}).get("tune") or {}
    except (OSError, ValueError):
        return {}


def _test_note(bundle: Any, data: str) -> str:
    test = (bundle.metrics or {}).get("test")
    if test:
        return (
            f"test accuracy {test['accuracy']:.4f} on {test['n']} images: the test "
            "split's only use in this search (every trial was scored on validation)"
        )
    return (
        f"{data} has no test split: the bundle is not tested (every trial and the bundle "
        "were scored on validation only); evaluate it on held-out data with imgrec "
        "evaluate"
    )
