"""`imgrec.tune(...)`: the search in one call (what `imgrec tune` runs).

    summary = imgrec.tune("photos/", model="efficientnet_lite0", mode="features", trials=20)
    summary.best["params"], summary.bundle       # the best options, OUT/best

Options beyond the search's own are TrainConfig options fixed for every trial
(`data_dir=...`, `image_size=...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .search import Search, TuneSettings, TuneSummary


def tune(
    data: Any,
    model: str | None = None,
    mode: str | None = None,
    trials: int = 20,
    *,
    timeout: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    space: str | Path | dict | None = None,
    metric: str = "val_accuracy",
    out: str | Path | None = None,
    pruner: str = "median",
    subset: int | None = None,
    seed: int = 0,
    sampler_seed: int | None = None,
    heartbeat: int = 30,
    keep_trials: bool = False,
    quiet: bool = False,
    **options: Any,
) -> TuneSummary:
    """Search TrainConfig options with Optuna (TPE + pruning) on the validation split; the
    study lives in OUT/study.db or `storage` and continues where it stopped. Returns the
    study's summary (also OUT/tune.json); the best trial's bundle is OUT/best."""
    from .outputs import finish

    settings = TuneSettings(
        data,
        model,
        mode,
        trials,
        timeout,
        study,
        storage,
        space,
        metric,
        out,
        pruner,
        subset,
        seed,
        sampler_seed,
        heartbeat,
        keep_trials,
        quiet,
        options,
    )
    search = Search(settings)
    search.prepare()
    search.open()
    for note in search.notes:
        search.log(f"note    {note}")
    search.log(opening_line(search, _counts(search)))
    search.run()
    return finish(search)


def opening_line(search: Search, counts: str) -> str:
    """What the search is about to do; the storage URL without its password (as everywhere
    it is printed or recorded)."""
    from .study import shown

    return (f"study   {search.study.study_name} ({shown(search.url)}): {counts}; searching "
            f"{', '.join(search.space.params)} ({search.mode} mode, {search.model})")


def _counts(search: Search) -> str:
    from .study import counts

    n = counts(search.study)
    return (
        f"{n['finished']} of {search.s.trials} trials finished ({n['complete']} complete, "
        f"{n['pruned']} pruned, {n['fail']} failed, {n['running']} running)"
    )


def summary_lines(s: TuneSummary) -> list[str]:
    """The search's result in a few lines (imgrec tune's output)."""
    t = s.trials
    lines = [
        f"study   {s.study} in {s.storage}: {t['finished']} finished ({t['complete']} "
        f"complete, {t['pruned']} pruned), {t['fail']} failed; {s.ran_here} ran here "
        f"in {s.seconds:.1f}s"
    ]
    if s.best is not None:
        recipe = (
            ""
            if s.recipe is None
            else f" (the recipe's own options, trial {s.recipe['trial']}: {s.recipe['value']:.4f})"
        )
        lines.append(f"best    trial {s.best['trial']}: {s.metric} {s.best['value']:.4f}{recipe}")
        lines.append(
            "        "
            + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in s.best["params"].items()
            )
        )
    if s.bundle:
        lines.append(f"bundle  {s.bundle}")
    lines.append(f"test    {s.test_note}")
    lines += [f"note    {n}" for n in s.notes]
    lines.append(f"files   {', '.join(s.files)}")
    return lines
