"""The Optuna study: its storage (SQLite in the output folder, or a PostgreSQL / MySQL URL that
several machines share), the sampler and pruner, and trials whose process died.

A process that dies mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING for ever in
Optuna's storage. The storage therefore runs Optuna's heartbeat: every running trial's
process records a heartbeat each `heartbeat` seconds, and any process of the study that
starts a trial (or finishes) marks a trial whose heartbeat is older than GRACE heartbeats as
FAIL and queues its parameters once more (RetryHeartbeatStaleTrialCallback). A live trial on
a busy machine is never failed by mistake as long as its heartbeat thread runs within the
grace period; failing RUNNING trials on resume instead would fail the live trials of the
other processes of a shared study.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ImgrecError

METRICS = {"val_accuracy": ("val_acc", "maximize"), "val_loss": ("val_loss", "minimize")}
PRUNERS = ("median", "halving", "none")
GRACE = 3  # heartbeats a trial may miss before it counts as dead
CONNECT_TIMEOUT_S = 10
SQLITE_LOCK_TIMEOUT_S = 120  # SQLite serialises writers: a process waits this long for a turn


@contextmanager
def quiet_optuna():
    """Optuna's log lines off (imgrec prints its own line per trial, and a failed trial's
    error is one line, not Optuna's traceback), and its experimental-feature warnings."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield optuna
        finally:
            optuna.logging.set_verbosity(level)


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def shown(url: str) -> str:
    """The URL without its password (it is printed and recorded)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL at all: the error about it says so)
        return url


#: the drivers a URL without one (postgresql://, mysql://) may use, in SQLAlchemy's order of
#: preference; SQLAlchemy 2.1 takes only its default (psycopg 3, mysqlclient), so a machine
#: with psycopg2 or PyMySQL alone would be told the driver is missing
#: (the module to look for, SQLAlchemy's name for its driver)
DRIVERS = {"postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
           "mysql": (("MySQLdb", "mysqldb"), ("pymysql", "pymysql"))}


def with_driver(url: str) -> str:
    """A PostgreSQL or MySQL URL that names no driver, given the first one installed here
    (`postgresql://` -> `postgresql+psycopg2://` where only psycopg2 is); any other URL, or
    one with no driver installed (its error says what to install), as it is."""
    from importlib.util import find_spec

    scheme, sep, rest = url.partition("://")
    base = {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme.lower(), scheme.lower())
    if not sep or "+" in scheme or base not in DRIVERS:
        return url
    dialect = "postgresql" if base == "postgresql" else scheme.lower()  # no postgres:// in 2.x
    for module, driver in DRIVERS[base]:
        if find_spec(module) is not None:
            return f"{dialect}+{driver}://{rest}"
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    if scheme in ("postgresql", "postgres", "mysql", "mariadb"):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


def open_storage(url: str, heartbeat: int) -> Any:
    """Optuna's RDBStorage with the heartbeat on; an unusable URL is one clear line."""
    import sqlalchemy.exc as sa

    with quiet_optuna() as optuna:
        where = f"--storage {shown(url)}"
        try:
            return _rdb_storage(with_driver(url), heartbeat)
        except ImportError as e:
            raise ImgrecError(
                f"{where}: no database driver for it ({_reason(e.__cause__ or e)})",
                "install one (PostgreSQL: pip install 'psycopg[binary]' or psycopg2-binary; "
                "MySQL: pip install pymysql)",
            ) from None
        except (sa.ArgumentError, sa.NoSuchModuleError):
            raise ImgrecError(
                f"{where} is not a database URL",
                "e.g. sqlite:///study.db, postgresql://user@host/db, mysql+pymysql://user@host/db",
            ) from None
        except (sa.SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as e:
            raise ImgrecError(f"{where}: cannot open it ({_reason(e)})") from None


def _rdb_storage(url: str, heartbeat: int, attempts: int = 10) -> Any:
    """Processes that start together on a new database race to create its tables (one of
    them is told a table "already exists"): the loser tries again, and finds them made."""
    import sqlalchemy.exc as sa
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(attempts):
        try:
            with _sqlite_turn(url):
                return RDBStorage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE * heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (sa.OperationalError, sa.IntegrityError) as e:
            racing = isinstance(e, sa.IntegrityError) or "already exists" in str(e)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


@contextmanager
def _sqlite_turn(url: str):
    """On SQLite, one process at a time opens the database (an flock on the file, which
    SQLite's own fcntl locks ignore), so the first one creates the tables alone."""
    prefix = "sqlite:///"
    path = Path(url[len(prefix) :]) if url.startswith(prefix) else None
    if path is None or not path.parent.is_dir() or str(path) in ("", ":memory:"):
        yield
        return
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = [x.strip() for x in str(orig).splitlines() if x.strip()]
    return lines[0] if lines else type(orig).__name__


def make_sampler(seed: int | None, trials: int) -> Any:
    """TPE, multivariate, with a few random trials first; `constant_liar` keeps the
    processes of one study from sampling the same point while each other's trials run."""
    import optuna

    startup = min(10, max(3, trials // 4))
    # group: the space is conditional (the mlp head's dropout is drawn only with that head),
    # and multivariate TPE models each group of options drawn together
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, group=True,
            constant_liar=True)


def make_pruner(name: str, warmup: int) -> Any:
    """median: stop a trial whose best value so far is worse than the median of the finished
    trials at the same epoch; halving: asynchronous successive halving (keep the top third at
    each rung). Neither stops a trial during its first `warmup` epochs."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(
    name: str, storage: Any, metric: str, sampler: Any, pruner: Any, identity: dict[str, Any]
) -> Any:
    """Create the study, or continue it (`identity` must match what it was made for)."""
    with quiet_optuna() as optuna:
        direction = METRICS[metric][1]
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        made_for = study.user_attrs.get("imgrec")
        if made_for is None:
            study.set_user_attr("imgrec", identity)
        elif differs := [k for k in identity  # (a key an older study lacks: not compared)
                         if k in made_for and made_for[k] != identity[k]]:
            raise ImgrecError(
                f"study {name!r} was made for another search ({', '.join(differs)}: "
                f"{', '.join(str(made_for.get(k)) for k in differs)})",
                "give another --study name, or the same options as before",
            )
        return study


def counts(study: Any) -> dict[str, int]:
    """Trials by state (lower-case names) and `finished` = complete + pruned."""
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def fail_stale(study: Any) -> None:
    """Mark trials whose process stopped beating as FAIL (their parameters run again once)."""
    with quiet_optuna() as optuna:
        optuna.storages.fail_stale_trials(study)
