"""imgrec tune (issue 15): the search space and its errors, pruning read back from the study,
the test split kept out of every trial, the feature cache shared by features-mode trials, and
two processes (one of them killed with SIGKILL, then rerun) on one SQLite study."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_fake_mnist

import imgrec
from imgrec.cli import main
from imgrec.errors import ImgrecError

IMGREC = str(Path(sys.executable).with_name("imgrec"))
#: a small, fast search: 4 epochs of fast-cnn on 180 training images, over the learning rate
SPACE = {
    "epochs": 4,
    "lr": {"low": 1e-4, "high": 0.3, "log": True},
    "augment": "none",
    "batch_size": 64,
    "weight_decay": None,
    "label_smoothing": None,
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """IMGREC_DATA-style root holding a tiny, learnable fake MNIST."""
    root = tmp_path_factory.mktemp("tune-data")
    write_fake_mnist(root, n_train=200, n_test=50)
    return root


def _study(out: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _states(out: Path, name: str) -> dict[str, int]:
    from imgrec.tuning.study import counts

    return counts(_study(out, name))


def test_pruning_stops_a_third_of_12_trials_and_trials_never_see_test(digits, tmp_path):
    out = tmp_path / "search"
    # 6 epochs: the pruner may stop a trial at epochs 2-5 (never after its last, when there
    # is nothing left to save)
    search = {"out": out, "data_dir": str(digits), "space": {**SPACE, "epochs": 6},
              "metric": "val_loss"}
    summary = imgrec.tune("mnist", trials=12, sampler_seed=0, quiet=True, **search)
    study = _study(out, summary.study)
    states = _states(out, summary.study)
    assert states["finished"] == 12 and states["fail"] == 0
    assert states["pruned"] >= 4, states  # a third of 12, read from the study itself
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(t.user_attrs["epochs_run"] < 6 for t in pruned)
    # the recipe's own options are trial 0; the best is at least as good on validation
    from imgrec.training.recipes import RECIPES

    assert study.trials[0].user_attrs["recipe"]
    assert study.trials[0].params == {"lr": RECIPES["mnist"]["lr"]}
    assert summary.best["value"] <= study.trials[0].value
    # the final bundle is the one run with the test split; trials were scored on validation
    meta = json.loads((out / "best" / "imgrec.json").read_text())
    assert meta["training"]["tune"]["trial"] == summary.best["trial"]
    assert meta["training"]["tune"]["test_split"] == "used once, by this bundle"
    assert meta["metrics"]["test"]["n"] == 50 and summary.test["n"] == 50
    assert (out / "best" / "model.onnx").is_file()
    # retrained with the trial's seed: the same run, up to the float sums of other thread counts
    assert summary.validation["val_loss"] == pytest.approx(summary.best["value"], rel=1e-3)
    for name in (
        "trials.csv",
        "tune.json",
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "intermediate_values.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 13
    assert not (out / "trials").exists()  # trials' bundles are removed
    # the evaluation report says how the options were chosen and where the test split went
    from imgrec.report import build_report

    built = build_report(out / "best", "mnist", tmp_path / "report", data_dir=str(digits),
                         mistakes=0, gradcam=False)  # fmt: skip
    page = built.path.read_text()
    assert "Hyperparameter search" in page and "used once, by this bundle" in page
    assert (tmp_path / "report" / "optimization_history.png").is_file()
    # the same command again continues the study: it already holds 12 trials
    again = imgrec.tune("mnist", trials=12, quiet=True, **search)
    assert again.ran_here == 0 and _states(out, summary.study)["finished"] == 12


def test_trial_bundles_have_no_test_split_and_no_onnx(digits, tmp_path):
    out = tmp_path / "kept"
    imgrec.tune(
        "mnist", trials=1, out=out, data_dir=str(digits), space=SPACE, keep_trials=True, quiet=True
    )
    trial = json.loads((out / "trials" / "0" / "imgrec.json").read_text())
    assert "test" not in trial["training"]["splits"] and not trial["metrics"]
    assert not (out / "trials" / "0" / "model.onnx").exists()  # onnx=False for trials
    best = json.loads((out / "best" / "imgrec.json").read_text())
    assert best["training"]["splits"]["test"] == 50
    assert best["training"]["splits"]["train"] == trial["training"]["splits"]["train"]
    # best/ damaged since: the same command trains it again instead of keeping it
    (out / "best" / "model.safetensors").unlink()
    (out / "best" / "model.onnx").unlink(missing_ok=True)
    imgrec.tune("mnist", trials=1, out=out, data_dir=str(digits), space=SPACE, quiet=True)
    assert (out / "best" / "model.safetensors").is_file()
    # another study into the same --out would replace its best/ and tune.json: refused
    with pytest.raises(ImgrecError, match="holds the search 'mnist-fast-cnn-scratch'"):
        imgrec.tune("mnist", trials=1, out=out, data_dir=str(digits), space=SPACE, quiet=True,
                    study="another")


BAD_SPACES = {
    "lr: {low: 1e-4, high: [1}": "not valid YAML",
    "lrr: {low: 1.0e-4, high: 1.0e-2}": "unknown parameter 'lrr'. Did you mean 'lr'?",
    "epochs: {low: 2, high: 3.5}": "epochs takes whole numbers",
    "label_smoothing: {low: 0.0, high: 1.5}": "label_smoothing=1.5 is out of range",
    "optimizer: [adamw, lion]": "optimizer='lion' is out of range",
    "- lr": "expected a mapping",
    "label_smoothing: 1.5": "label_smoothing=1.5 is out of range",  # a fixed value
    'lr: "abc"': "lr: 'abc' is not a number",
    'epochs: "ten"': "epochs: 'ten' is not a number",
    "epochs: 0": "Allowed: at least 1",  # was "from 1 to None"
}
BAD_STORAGES = {
    "sqlite:////nonexistent/folder/study.db": "cannot open it (unable to open database file)",
    "postgresql://tuner:secret@127.0.0.1:9/study": "no database driver",
    "not-a-url": "is not a database URL",
}
BAD_INPUTS = [("--space", k, v) for k, v in BAD_SPACES.items()] + [
    ("--storage", k, v) for k, v in BAD_STORAGES.items()
]


@pytest.mark.parametrize("option, value, expected", BAD_INPUTS)
def test_a_bad_space_or_storage_is_one_line_and_exit_2(
    digits, tmp_path, capsys, monkeypatch, option, value, expected
):
    monkeypatch.setenv("IMGREC_DATA", str(digits))
    for driver in ("psycopg", "psycopg2"):  # no PostgreSQL driver, whatever is installed
        monkeypatch.setitem(sys.modules, driver, None)
    start = "space file" if option == "--space" else "--storage"
    if option == "--space":
        (tmp_path / "space.yaml").write_text(value + "\n")
        value = str(tmp_path / "space.yaml")
    rc = main(["tune", "mnist", option, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"imgrec: error: {start}"), err
    assert expected in err[0], err[0]
    assert "secret" not in err[0]  # a storage URL's password is never printed
    assert not (tmp_path / "o").exists()  # nothing is left behind


def test_out_a_folder_of_other_files_is_refused(digits, tmp_path, capsys, monkeypatch):
    """As `imgrec train --out` refuses it: the search would write among the user's files."""
    monkeypatch.setenv("IMGREC_DATA", str(digits))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["tune", "mnist", "--trials", "2", "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty and holds no search (notes.txt)" in err[0], err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_a_url_without_a_driver_gets_the_one_installed(monkeypatch):
    """SQLAlchemy 2.1 takes psycopg 3 (mysqlclient) for postgresql:// (mysql://): a machine
    with psycopg2 (PyMySQL) alone is given it; a URL naming its driver is left alone."""
    import importlib.util

    from imgrec.tuning.study import with_driver

    installed = {"psycopg2", "pymysql"}
    real = importlib.util.find_spec
    drivers = {"psycopg", "psycopg2", "MySQLdb", "pymysql"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real(name, *a) if name not in drivers else
                        object() if name in installed else None)
    assert with_driver("postgresql://u:p@h:5433/db") == "postgresql+psycopg2://u:p@h:5433/db"
    assert with_driver("postgres://h/db") == "postgresql+psycopg2://h/db"
    assert with_driver("mysql://h/db") == "mysql+pymysql://h/db"
    assert with_driver("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert with_driver("sqlite:///study.db") == "sqlite:///study.db"
    installed.add("psycopg")
    assert with_driver("postgresql://h/db") == "postgresql+psycopg://h/db"
    installed.clear()
    assert with_driver("postgresql://h/db") == "postgresql://h/db"  # its error says what to get


def test_the_opening_line_hides_the_storage_password():
    from types import SimpleNamespace

    from imgrec.tuning.api import opening_line

    search = SimpleNamespace(study=SimpleNamespace(study_name="pets"), mode="scratch",
                             url="postgresql://tuner:secret@db:5432/tune", model="fast-cnn",
                             space=SimpleNamespace(params=["lr"]))
    line = opening_line(search, "0 of 8 trials finished")
    assert "secret" not in line and "postgresql://tuner:***@db:5432/tune" in line


def test_transfer_spaces_search_the_heads_dropout_and_finetunes_layer_decay():
    """features: the mlp head's dropout; finetune: the layer-wise lr decay; the recipe's own
    values (0.5, 0.85) are the first trial's and pass TrainConfig's checks."""
    from types import SimpleNamespace

    from imgrec.augment import Augment
    from imgrec.training.config import TrainConfig
    from imgrec.tuning.space import Space, check_space, default_space, recipe_point

    for mode, name, low, high in (("features", "dropout", 0.0, 0.7),
                                  ("finetune", "layer_decay", 0.6, 1.0)):
        plan = SimpleNamespace(lr=1e-3, epochs=10, batch_size=32, mode=mode,
                               augment=Augment.parse("light"), cfg=TrainConfig(data="x"),
                               weight_decay=1e-2, label_smoothing=0.1, optimizer="adamw",
                               patience=2, model_name="efficientnet_lite0", image_size=224,
                               contract=SimpleNamespace(tta=()))
        space = default_space(plan)
        assert (space[name].low, space[name].high) == (low, high)
        point = recipe_point(plan)
        assert (point["dropout"], point["layer_decay"]) == (0.5, 0.85)
        assert space[name].contains(point[name])
        check_space(Space(space, {}), {"mode": mode, "model": "efficientnet_lite0"})
    # --unfreeze from a space file: an int range; trial 0 keeps "all" (no value) unless the
    # command line gave one
    from imgrec.errors import ImgrecError
    from imgrec.tuning.space import Param, build_space

    unfreeze = build_space({}, {"unfreeze": {"low": 1, "high": 17}}, {}).params["unfreeze"]
    assert (unfreeze.kind, unfreeze.low, unfreeze.high) == ("int", 1, 17)
    assert "unfreeze" not in recipe_point(plan)
    plan.cfg = TrainConfig(data="x", unfreeze=4)
    assert recipe_point(plan)["unfreeze"] == 4
    with pytest.raises(ImgrecError):
        check_space(Space({"unfreeze": Param("unfreeze", "int", 0, 4)}, {}),
                    {"mode": "finetune", "model": "efficientnet_lite0"})


@pytest.mark.parametrize("stop", ["sigterm", "full disk"])
def test_sigterm_in_a_trial_is_one_line_and_a_failed_trial(digits, tmp_path, capsys, monkeypatch,
                                                           stop):
    """The training loop turns SIGTERM into an interrupted run; the trial fails, the command
    says so in one line and exits 143 (Typer would turn it into a silent 130). A full disk
    also stops the search, and its point (the recipe's) was lost: a rerun skipped it."""
    import errno

    from imgrec.training import runners
    from imgrec.training.engine import Terminated

    def stopped(plan, callbacks=(), report_skipped=True):
        if stop == "sigterm":
            raise Terminated()
        raise OSError(errno.ENOSPC, "No space left on device", str(plan.out / "x"))

    monkeypatch.setenv("IMGREC_DATA", str(digits))
    monkeypatch.setattr(runners, "run_plan", stopped)
    rc = main(["tune", "mnist", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    want = (143, "imgrec: interrupted") if stop == "sigterm" else (1, "imgrec: error: no space")
    assert rc == want[0] and len(err) == 1 and err[0].startswith(want[1]), err
    assert _states(tmp_path / "o", "mnist-fast-cnn-scratch")["fail"] == 1
    # its point, the recipe's, is queued again: the same command resumed runs it first
    study = _study(tmp_path / "o", "mnist-fast-cnn-scratch")
    failed, waiting = study.trials
    assert failed.state.name == "FAIL" and waiting.state.name == "WAITING"
    assert waiting.system_attrs["fixed_params"] == failed.params
    assert waiting.user_attrs.get("recipe") is True
    monkeypatch.undo()
    monkeypatch.setenv("IMGREC_DATA", str(digits))
    assert main(["tune", "mnist", "--out", str(tmp_path / "o"), "-q", "--trials", "1"]) == 0
    ran = _study(tmp_path / "o", "mnist-fast-cnn-scratch").trials[1]
    assert ran.state.name == "COMPLETE" and ran.params == failed.params


@pytest.mark.slow
def test_features_trials_share_the_feature_cache(shapes, tmp_path, monkeypatch):
    """Only the first trial embeds images; later ones read the cache (test images are
    embedded by the final bundle alone). Its own cache: the counts assume an empty one, and
    another test embedding the same (seeded) shapes once failed this one."""
    monkeypatch.setenv("IMGREC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "features"
    summary = imgrec.tune(
        str(shapes),
        model="efficientnet_lite0",
        mode="features",
        trials=3,
        out=out,
        # the linear head: its trials and the best's retraining leave the mlp head's dropout
        # (still in the space) out; the retraining refused it and the search never finished
        space={"augment_views": 0, "head": "linear"},
        sampler_seed=1,
        quiet=True,
    )
    trials = _study(out, summary.study).trials
    assert not any("dropout" in t.params for t in trials)  # moot with the linear head: not drawn
    n_train_val = trials[0].user_attrs["features_computed"]
    assert n_train_val == 72  # 80 images less the 8 of the test split
    assert [t.user_attrs["features_computed"] for t in trials[1:]] == [0, 0]
    assert [t.user_attrs["features_cached"] for t in trials[1:]] == [72, 72]
    best = json.loads((out / "best" / "imgrec.json").read_text())["training"]
    assert best["features_computed"] == 8 and best["features_cached"] == 72


def _tune_cmd(out: Path, trials: int, space: Path, *more: str) -> list[str]:
    return [IMGREC, "tune", "mnist", "--out", str(out), "--trials", str(trials), "--space",
            str(space), "--metric", "val_loss", "--json", *more]  # fmt: skip


def _running_mid_trial(db: Path, after: int) -> int | None:
    """A trial that is running, beating and past its first epoch (its parameters drawn)."""
    with sqlite3.connect(db, timeout=30) as con:
        row = con.execute(
            "SELECT t.number FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
            "WHERE t.state = 'RUNNING' AND t.number >= ? AND EXISTS (SELECT 1 FROM "
            "trial_intermediate_values v WHERE v.trial_id = t.trial_id)",
            (after,),
        ).fetchone()
    return row[0] if row else None


@pytest.mark.slow
def test_two_processes_share_a_study_and_a_killed_one_loses_only_its_trial(digits, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "shared"
    env = {**os.environ, "IMGREC_DATA": str(digits)}
    both = [
        subprocess.Popen(
            _tune_cmd(out, 4, space),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ran = []
    for p in both:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        ran.append(json.loads(stdout)["ran_here"])
    name = "mnist-fast-cnn-scratch"
    states = _states(out, name)
    assert states["fail"] == 0 and states["finished"] == sum(ran) >= 4, (states, ran)
    # a third process, killed with SIGKILL in the middle of a trial, then run again
    killed = subprocess.Popen(
        _tune_cmd(out, 8, space, "--heartbeat", "1"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, number = time.time() + 300, None
    while number is None and time.time() < deadline and killed.poll() is None:
        time.sleep(0.1)
        number = _running_mid_trial(out / "study.db", sum(ran))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert number is not None
    time.sleep(3.5)  # its heartbeat (each second) is now stale: 3 missed
    rerun = subprocess.run(
        _tune_cmd(out, 8, space, "--heartbeat", "1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = _study(out, name)
    failed = [t.number for t in study.trials if t.state.name == "FAIL"]
    assert failed == [number]  # only the killed trial was lost...
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert len(retried) == 1 and retried[0].params == study.trials[number].params  # ...and rerun
    assert _states(out, name)["finished"] == 8 and _states(out, name)["running"] == 0
    assert not (out / "trials").exists()


def test_unreadable_files_are_listed_once_not_per_trial(shapes, tmp_path, capfd):
    """Every trial reads the same files: the list of unreadable ones comes out once, from
    the final run, not from each trial."""
    bad = next((shapes).rglob("*.png"), None) or next(shapes.rglob("*.jpg"))
    (bad.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    imgrec.tune(str(shapes), model="fast-cnn", trials=2, out=tmp_path / "t", quiet=True,
                space={"epochs": 1, "image_size": 32, "batch_size": 16}, sampler_seed=0)
    err = capfd.readouterr().err
    assert err.count("unreadable file(s):") == 1 and "broken.png" in err, err


def test_the_last_epoch_is_never_pruned():
    """A pruner's verdict after the last epoch would only discard a finished run (it made
    test_pruning_stops_a_third_of_12_trials... fail now and then: a trial 'pruned' at epoch
    4 of 4). Before the last epoch the run stops; at it, the trial stays complete."""
    from types import SimpleNamespace

    from imgrec.tuning.search import TrialReporter

    class AlwaysPrune:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    stops = []
    state = SimpleNamespace(stage="train", epochs=4, plan=SimpleNamespace(mode="scratch"),
                            stop=stops.append)
    last = TrialReporter(AlwaysPrune(), "val_loss")
    last.on_epoch_end(state, 4, {"val_loss": 0.5})
    assert last.pruned_at is None and not stops and last.trial.reports == [(4, 0.5)]
    early = TrialReporter(AlwaysPrune(), "val_loss")
    early.on_epoch_end(state, 2, {"val_loss": 0.7})
    assert early.pruned_at == 2 and stops == ["pruned by the tuner at epoch 2"]


def test_a_fixed_number_in_either_yaml_form_is_a_number():
    """docs/tune.md: `1e-4` (a string to YAML 1.1) and `1.0e-4` are both numbers. In a range
    or a list they were; as a single fixed value `lr: 1e-4` was refused ("--lr must be a
    number, not '1e-4'")."""
    import yaml

    from imgrec.errors import ImgrecError
    from imgrec.tuning.space import build_space, check_fixed, fixed_values

    raw = yaml.safe_load("lr: 1e-4\nweight_decay: 1.0e-3\nbatch_size: 64\naugment: none\n")
    assert raw["lr"] == "1e-4"  # YAML 1.1's reading, which the space must undo
    fixed = fixed_values(raw, "space file s.yaml")
    assert fixed == {"lr": 1e-4, "weight_decay": 1e-3, "batch_size": 64, "augment": "none"}
    check_fixed(fixed, {}, "space file s.yaml")
    assert build_space({}, raw, {}).fixed["lr"] == 1e-4
    with pytest.raises(ImgrecError, match="batch_size takes whole numbers"):
        fixed_values({"batch_size": "6.5"}, "space file s.yaml")


def test_a_trial_draws_the_heads_dropout_only_with_the_mlp_head():
    """The mlp head's dropout was drawn (and recorded) in trials that drew the linear head,
    which leave it out: the sampler modelled an option that did nothing there."""
    from types import SimpleNamespace

    import optuna

    from imgrec.tuning.search import Search
    from imgrec.tuning.space import Param, Space

    params = {"dropout": Param("dropout", "float", 0.0, 0.7),
              "head": Param("head", "categorical", choices=("linear", "mlp")),
              "lr": Param("lr", "float", 1e-4, 1e-2, log=True)}
    search = SimpleNamespace(space=Space(params, {}))
    linear = optuna.trial.FixedTrial({"head": "linear", "lr": 1e-3})  # asking for dropout fails
    assert Search.suggest(search, linear) == {"head": "linear", "lr": 1e-3}
    mlp = optuna.trial.FixedTrial({"head": "mlp", "lr": 1e-3, "dropout": 0.3})
    assert Search.suggest(search, mlp) == {"head": "mlp", "lr": 1e-3, "dropout": 0.3}
    fixed_mlp = SimpleNamespace(space=Space({k: params[k] for k in ("dropout", "lr")},
                                            {"head": "mlp"}))
    both = optuna.trial.FixedTrial({"lr": 1e-3, "dropout": 0.2})
    assert Search.suggest(fixed_mlp, both) == {"lr": 1e-3, "dropout": 0.2}


def test_a_study_is_continued_only_with_the_same_subset_and_seed():
    """A resumed search with another --subset or --seed ran its trials into the same study,
    and a trial on 10 images (or another seed) could become the best; a study made before
    the subset and seed were recorded is still continued."""
    import optuna

    from imgrec.tuning import study as st

    storage = optuna.storages.InMemoryStorage()
    made = {"dataset": "d", "mode": "scratch", "model": "m", "metric": "val_accuracy",
            "subset": None, "seed": 0}

    def opened(**changed):
        return st.open_study("s", storage, "val_accuracy", optuna.samplers.RandomSampler(),
                             optuna.pruners.NopPruner(), {**made, **changed})

    opened()
    opened()  # the same search: continued
    for changed in ({"subset": 10}, {"seed": 7}):
        with pytest.raises(ImgrecError, match=f"made for another search \\({next(iter(changed))}"):
            opened(**changed)
    older = {k: made[k] for k in ("dataset", "mode", "model", "metric")}
    st.open_study("old", storage, "val_accuracy", optuna.samplers.RandomSampler(),
                  optuna.pruners.NopPruner(), older)
    st.open_study("old", storage, "val_accuracy", optuna.samplers.RandomSampler(),
                  optuna.pruners.NopPruner(), {**made, "seed": 3})


def test_importances_are_scored_on_every_trial_not_those_that_drew_dropout():
    """With dropout drawn only in mlp-head trials, Optuna scored importance on those trials
    alone (the ones holding every parameter), and dropout could rank first doing nothing."""
    import optuna

    from imgrec.tuning.plots import shared_params

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        if trial.suggest_categorical("head", ["linear", "mlp"]) == "mlp":
            trial.suggest_float("dropout", 0.0, 0.7)
        return lr

    study.optimize(objective, n_trials=12)
    assert shared_params(study) == ["head", "lr"]
    plain = optuna.create_study()
    plain.optimize(lambda t: t.suggest_float("lr", 0, 1), n_trials=3)
    assert shared_params(plain) is None  # every trial drew every option: Optuna's default
