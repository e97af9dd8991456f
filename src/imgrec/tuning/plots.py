"""The study's figures: optimisation history, parameter importances, parallel coordinates
and each trial's validation metric per epoch (where the pruned ones stopped), drawn by
optuna.visualization.matplotlib (headless, on an Agg backend) and written through
figures.save_figure like every other imgrec figure."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..figures import agg_pyplot, save_figure

PLOTS = {
    "optimization_history.png": ("plot_optimization_history", (9, 5)),
    "param_importances.png": ("plot_param_importances", (8, 5)),
    "parallel_coordinate.png": ("plot_parallel_coordinate", (11, 5)),
    "intermediate_values.png": ("plot_intermediate_values", (9, 5)),  # pruned trials too
}


def draw_plots(study: Any, out: Path, metric: str) -> tuple[list[Path], list[str]]:
    """The PNGs that the study's trials allow (importances need two finished trials with
    different values, for instance): (written paths, one note per figure left out)."""
    from .study import quiet_optuna

    written, notes = [], []
    with agg_pyplot() as plt, quiet_optuna(), plt.rc_context(), \
            warnings.catch_warnings():  # Optuna sets ggplot
        # Optuna's and matplotlib's notes while drawing (an importance evaluator's caveat,
        # "identical low and high ylims" for a parameter all trials shared): not the user's
        warnings.simplefilter("ignore", UserWarning)
        from optuna.visualization import matplotlib as vis

        for name, (function, size) in PLOTS.items():
            per_epoch = function == "plot_intermediate_values"  # takes no target name
            try:
                options = {} if per_epoch else {"target_name": metric}
                if function == "plot_param_importances":
                    options["params"] = shared_params(study)
                ax = getattr(vis, function)(study, **options)
                if per_epoch:
                    ax.set(xlabel="epoch", ylabel=f"{metric} (each epoch)")
            except Exception as e:  # noqa: BLE001 (too few trials for this figure)
                plt.close("all")
                notes.append(f"{name} not drawn: {str(e).splitlines()[0] if str(e) else e!r}")
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            if not fig.axes or not any(a.has_data() for a in fig.axes):
                plt.close(fig)
                notes.append(f"{name} not drawn: no finished trial to show")
                continue
            fig.set_size_inches(*size)
            written.append(save_figure(fig, out / name))
    return written, notes


def shared_params(study: Any) -> list[str] | None:
    """The options every finished trial drew (None: all of them). Optuna scores importance
    on the trials that hold every option asked about: with the conditional dropout (drawn
    only with the mlp head) that was the mlp trials alone, and dropout could rank first
    while it did nothing."""
    drawn = [set(t.params) for t in study.trials if t.state.name == "COMPLETE"]
    if not drawn:
        return None
    shared = set.intersection(*drawn)
    return None if shared == set.union(*drawn) else sorted(shared)
