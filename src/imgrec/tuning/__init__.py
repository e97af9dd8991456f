"""`imgrec tune`: hyperparameter search with Optuna over ordinary training runs.

space.py   the search space: per-mode defaults around the recipe, a YAML/JSON space file
study.py   the Optuna study in an RDB storage (SQLite by default), pruners, stale trials
search.py  the search: one trial = one training run with a pruning callback; the best
           trial retrained into an ordinary bundle; trials.csv, plots, tune.json

The package is not called `tune`: a submodule of that name would replace the public
function `imgrec.tune(...)` on the package once imported (see docs/architecture.md).
"""
