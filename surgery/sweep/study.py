"""The study of `surgery sweep`: its storage (an SQLAlchemy URL; SQLite by default, waited for
aloud when another process holds it locked) and the study itself, created once and filled with
every variant once.

Exactly once. The study is created by one command (the others load it) and its creator queues
each variant as one WAITING trial; a worker takes a trial by moving it from WAITING to RUNNING,
which the storage does for one worker only. (PostgreSQL locks the row; SQLite ignores Optuna's
FOR UPDATE, so its transactions are made `BEGIN IMMEDIATE`: without that, two processes take the
same trial.) Optuna's own GridSampler is not used: it picks the next grid point from what it sees
unvisited, so two workers can pick the same one, and it calls `study.stop()`, which only works
inside `study.optimize`.

Workers that die. While a worker trains, a thread records Optuna heartbeats; a trial whose
heartbeat is older than the grace period is failed by the next worker that looks and queued
again (`RetryHeartbeatStaleTrialCallback`), with the same params, so the same run directory:
whoever takes it resumes from its `checkpoints/last.pt`. Idle workers wait while trials run, to
take over such a trial. Heartbeats need an RDB storage (Optuna 5.0's journal storage has none),
so the default storage is SQLite: `runs/<sweep>/study.db`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import Origin, SpecError, UsageError, describe_exception
from .file import Prune, Sweep, Variant
from .worker import variant_attrs

LOCK_TIMEOUT = 120.0  # seconds a command waits for an SQLite study another process holds locked (--lock-timeout)
_QUEUED = "surgery.queued"  # study user attrs: set by the study's creator once every trial is queued
_FINGERPRINT = "surgery.fingerprint"
_DEFINITION = "surgery.sweep"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError(
            "surgery sweep needs Optuna, which is not installed",
            origin=Origin("flag", "surgery sweep"),
            expected="the packages of the extra surgery[optuna]",
            hint="pip install 'surgery[optuna]' (PostgreSQL storage: also psycopg2-binary)",
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# --------------------------------------------------------------------------- storage
def default_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def shown_url(url: str) -> str:
    """The storage URL with its password hidden (it goes into sweep.json and messages)."""
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def open_storage(
    url: str,
    heartbeat: int,
    grace: int,
    *,
    flag: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    note: Callable[[str], None] | None = None,
) -> Any:
    """Optuna's RDBStorage with heartbeats; on SQLite, with transactions that lock the database
    as they begin, so that taking a trial (read WAITING, write RUNNING) is atomic.

    Args:
        heartbeat, grace: seconds between a worker's heartbeats, and without one before its trial
            is failed and queued again (at most 3 times).
        flag: the URL came from --storage (for the error's origin).
        lock_timeout: seconds to wait for an SQLite database that another process holds locked
            (here, and on every later statement), before giving up.
        note: told, once, when the database is found locked and the command starts to wait.

    Raises:
        UsageError: not a database URL, its driver is missing, or the database cannot be reached
            (exit code 1), or an SQLite database stayed locked for `lock_timeout` seconds (exit code 1).
    """
    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    origin = Origin.flag("--storage", shown_url(url)) if flag else Origin.path(shown_url(url))
    sqlite = url.startswith("sqlite")
    if sqlite:
        _wait_for_sqlite(url, lock_timeout, note or (lambda text: None), origin)
    try:
        storage = optuna.storages.RDBStorage(
            _with_driver(url),
            heartbeat_interval=heartbeat,
            grace_period=grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            engine_kwargs={"connect_args": {"timeout": lock_timeout}} if sqlite else {"pool_pre_ping": True},
        )
    except ImportError as exc:
        cause = describe_exception(exc.__cause__ or exc)
        raise UsageError(
            f"the storage's database driver is not installed ({cause})",
            origin=origin,
            expected="a driver for this URL",
            hint="PostgreSQL: pip install 'surgery[postgres]' (psycopg2-binary)",
        ) from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's URL, connection and schema errors alike
        unreachable = type(exc).__name__ in ("OperationalError", "StorageInternalError")
        err = UsageError(
            f"cannot open the study storage: {describe_exception(exc)}",
            origin=origin,
            expected="an SQLAlchemy database URL: sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DB",
            hint="is the database server running and the database created?" if unreachable else None,
        )
        if unreachable:
            err.exit_code = 1  # the machine is at fault, not what was asked
        raise err from None
    if sqlite:
        _immediate_transactions(storage.engine)
    return storage


def _sqlite_file(url: str) -> Path | None:
    """The database file of an sqlite:/// URL (None: in memory, or a URL SQLAlchemy cannot read)."""
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        return Path(database) if database and database != ":memory:" else None
    return None


def _wait_for_sqlite(url: str, timeout: float, note: Callable[[str], None], origin: Origin) -> None:
    """Return once the SQLite database can be written, saying so when another process holds it
    locked (an open write transaction: another command, an `sqlite3` shell, a backup); give up
    after `timeout` seconds. SQLite's own busy wait says nothing: a locked study looked like a
    command that hangs."""
    import sqlite3

    path = _sqlite_file(url)
    if path is None or not path.is_file():
        return  # a new database: nobody can hold it yet
    start = time.monotonic()
    said = False
    while True:
        try:
            connection = sqlite3.connect(str(path), timeout=0, isolation_level=None)
            try:
                connection.execute("BEGIN IMMEDIATE")  # the lock a worker takes to pop a trial
                connection.execute("ROLLBACK")
            finally:
                connection.close()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                return  # not a lock: Optuna's own opening says what is wrong
        waited = time.monotonic() - start
        if waited >= timeout:
            err = UsageError(
                f"the study's database {path} stayed locked by another process for {timeout:g} s",
                origin=origin,
                expected="a database no other process holds in a write transaction",
                hint="is another surgery sweep, an sqlite3 shell or a backup holding it? Close it and "
                "run the command again, or wait longer with --lock-timeout SECONDS",
            )
            err.exit_code = 1  # the machine is at fault, not what was asked
            raise err
        if not said and waited >= min(1.0, timeout / 4):  # a worker's own transaction lasts milliseconds
            note(
                f"waiting for {path}: another process holds the study's database locked "
                f"(giving up after {timeout:g} s; --lock-timeout SECONDS to change)"
            )
            said = True
        time.sleep(0.1)


def _with_driver(url: str) -> str:
    """`postgresql://` with psycopg2 when psycopg 3 is absent: SQLAlchemy 2.1 made psycopg 3 the
    default driver, and the postgres extra installs psycopg2-binary."""
    import importlib.util

    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def _immediate_transactions(engine: Any) -> None:
    """SQLAlchemy's recipe for SQLite transactions that hold the write lock from their start
    (pysqlite otherwise begins one only at the first write, after the read it depends on)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _autocommit(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite: no implicit BEGIN; the hook below emits it

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks close


# --------------------------------------------------------------------------- the study
def open_study(
    sweep: Sweep, storage: Any, digest: str, say: Callable, variants: Callable[[], Sequence[Variant]] | None = None
) -> Any | None:
    """Load the study a previous (or another machine's) command created, refusing one made from
    another sweep definition; or, given `variants`, create it and queue every variant once.

    Args:
        digest: `sweep_file.fingerprint` of this sweep.
        variants: checks and returns the grid's variants (empty for random and tpe, whose trials
            are queued blank: the sampler fills each in when a worker takes it). Called only when
            the study is new: a sweep that is continued was checked when it started.

    Returns:
        The study; None when it does not exist and `variants` is None.
    """
    optuna = _optuna()
    with contextlib.suppress(KeyError):
        study = optuna.load_study(study_name=sweep.name, storage=storage)
        _check_same_sweep(sweep, study, digest, say)
        return study
    if variants is None:
        return None
    queue = variants()
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, direction=sweep.direction)
    except optuna.exceptions.DuplicatedStudyError:  # another command created it meanwhile
        return open_study(sweep, storage, digest, say)
    study.set_user_attr(_FINGERPRINT, digest)
    study.set_user_attr(_DEFINITION, sweep.definition())
    for variant in queue:
        study.enqueue_trial(dict(variant.params), user_attrs=variant_attrs(variant))
    for _ in range(sweep.trials if sweep.sampler != "grid" else 0):
        study.enqueue_trial({})
    study.set_user_attr(_QUEUED, sweep.trials)
    return study


def _check_same_sweep(sweep: Sweep, study: Any, digest: str, say: Callable, wait: float = 60.0) -> None:
    deadline = time.monotonic() + wait
    while _QUEUED not in study.user_attrs:  # its creator is still queueing (another machine, or a moment ago)
        if time.monotonic() > deadline:
            raise UsageError(
                f"the study {sweep.name!r} exists but its trials were never queued",
                origin=Origin.file(sweep.file),
                found="a study without the attribute " + _QUEUED,
                expected="a study made by surgery sweep",
                hint="its creator stopped while queueing: delete it (optuna delete-study "
                f"--study-name {sweep.name} --storage URL) and run again",
            )
        say(f"waiting for the study {sweep.name!r} to be filled by the command that created it")
        time.sleep(2.0)
    if study.user_attrs.get(_FINGERPRINT) != digest:
        raise SpecError(
            f"the study {sweep.name!r} was made from another sweep",
            origin=Origin.file(sweep.file),
            found="the sweep file, its base spec or --set changed since the study was created",
            expected="the same definition, to continue the sweep",
            hint="give the sweep a new `name:` to start another one, or remove the old study "
            "(its study.db) to start this one again",
        )


# --------------------------------------------------------------------------- the pruner
def make_pruner(prune: Prune, epochs: int) -> Any:
    """Optuna's pruner for `prune`, its steps being epochs (a run reports after each, step 1 the
    first); None for `pruner: none`.

    Args:
        epochs: the base spec's train.epochs: Hyperband's max_resource.
    """
    optuna = _optuna()
    if prune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=prune.min_epochs, reduction_factor=prune.reduction_factor
        )
    if prune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=prune.min_epochs,
            max_resource=max(epochs, prune.min_epochs),
            reduction_factor=prune.reduction_factor,
        )
    if prune.pruner == "median":
        # it may prune from step n_warmup_steps on; steps count epochs from 1
        return optuna.pruners.MedianPruner(n_startup_trials=prune.startup_trials, n_warmup_steps=prune.min_epochs)
    return None


def trial_counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}


__all__ = [
    "LOCK_TIMEOUT",
    "default_storage",
    "shown_url",
    "open_storage",
    "open_study",
    "make_pruner",
    "trial_counts",
]
