"""Study storage that survives dead workers: heartbeats on SQL (SQLite, PostgreSQL) and journal
storage, stale trials failed and re-queued, and the tally of what counts toward ``--trials``
(see ``tuning.py``'s docstring for the rules)."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from nestar_lab.config.errors import BadInput, ConfigError, one_line
from nestar_lab.sweep.study import StudySpec

_RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)
MAX_RETRIES = 3  # a lost trial is re-queued at most this many times (then a new trial is sampled)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward ``--trials``
HEARTBEAT_KEY = "nestar:heartbeat"  # journal storage: the last heartbeat (seconds since the epoch)
OBJECTIVES_KEY = "nestar:objectives"  # study user attribute: the objectives it was created for


class StudyFailed(RuntimeError):
    """A study run that did not end as asked (a worker died, errors in a row, interrupted).
    ``exit_code``: what ``nestar study run`` exits with. The message is one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def default_storage(spec: StudySpec) -> str:
    """An SQLite file inside the study's directory: embedded, nothing to set up."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(spec.study_dir / 'study.db').resolve()}"


def _retry_callback():
    return _RETRY(max_retry=MAX_RETRIES, inherit_intermediate_values=True)


def _serialise_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna claims a queued trial by reading it ``FOR UPDATE`` and setting it RUNNING if it was
    still WAITING; SQLite ignores ``FOR UPDATE``, so two workers starting together could both
    read WAITING and both run the same trial (one then failed it: its run directory was locked
    by the other). Taken at ``BEGIN``, the lock makes the read and the write one step."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN (deferred) is off

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (table creation) are not reused


class _RDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage (heartbeats in its own table, timed by the database's clock), which
    also fails a RUNNING trial that never sent a heartbeat (its worker died between creating
    the trial and the first beat) once it started longer than the grace period ago. On SQLite
    every transaction holds the write lock from its start (:func:`_serialise_sqlite`)."""

    def __init__(self, url: str, **kwargs) -> None:
        sqlite = url.startswith("sqlite")
        if sqlite:  # a worker waits for the lock (BEGIN IMMEDIATE) up to a minute, not the driver's 5 s
            kwargs.setdefault("engine_kwargs", {"connect_args": {"timeout": 60}})
        super().__init__(url, **kwargs)
        if sqlite:
            _serialise_sqlite(self.engine)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.url.startswith("sqlite"):
            _serialise_sqlite(self.engine)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        try:
            from optuna.storages._rdb import models

            cutoff = datetime.now() - timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
            session = self.scoped_session()
            try:
                beating = session.query(models.TrialHeartbeatModel.trial_id)
                rows = (
                    session.query(models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study_id)
                    .filter(models.TrialModel.state == TrialState.RUNNING)
                    .filter(~models.TrialModel.trial_id.in_(beating))
                    .all()
                )
            finally:
                session.close()
            for (trial_id,) in rows:
                started = self.get_trial(trial_id).datetime_start  # local time, as optuna gives it
                if started is not None and started.tzinfo is not None:
                    started = started.astimezone().replace(tzinfo=None)
                if trial_id not in stale and started is not None and started < cutoff:
                    stale.append(trial_id)
        except Exception:  # optuna internals moved: optuna's own detection still holds
            pass
        return stale


class _JournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Journal storage with heartbeats (optuna's journal has none): each beat is a trial system
    attribute holding the wall-clock time; a RUNNING trial whose last beat (or start) is older
    than the grace period is stale. Machines sharing a journal need clocks within the grace."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, callback) -> None:
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period, self._stale_callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except (UpdateFinishedTrialError, KeyError):  # failed meanwhile by another process
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else now
            # a retry inherits its origin's attributes, an old beat among them: the start counts too
            last = max(float(t.system_attrs.get(HEARTBEAT_KEY, 0.0)), started)
            if now - last > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback

    def get_failed_trial_callback(self):  # the abstract name in optuna < 4.9
        return self._stale_callback


SUPPORTED = "sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DB or journal:PATH"


def check_storage(url: str) -> None:
    """Refuse, before any work, a storage URL that cannot be opened: :class:`BadInput` (exit 2)
    naming the URL (password masked) and what failed, in plain words. A server is connected to
    once (10 s at most); SQLite and journal files must have an existing directory."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if url.startswith("journal:"):
        _check_file_place(url, Path(url[len("journal:") :]))
        return
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BadInput(f"--storage {url!r}: not a storage URL; give {SUPPORTED}") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise BadInput(f"--storage {shown}: unknown scheme {parsed.drivername!r}; supported: {SUPPORTED}") from None
    except ImportError as exc:
        raise BadInput(f"--storage {shown}: the database driver for {parsed.drivername!r} is not installed "
                       f"({exc.name or exc}); install it or use {SUPPORTED}") from None  # fmt: skip
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            _check_file_place(shown, Path(parsed.database))
        return
    engine = create_engine(parsed, connect_args={"connect_timeout": 10})
    try:
        with engine.connect():
            pass
    except Exception as exc:  # psycopg's OperationalError and the like: say it plainly, one line
        where = f"{parsed.host or 'localhost'}:{parsed.port or 'the default port'}"
        reason = one_line(getattr(exc, "orig", None) or exc).removeprefix("connection failed: ")
        raise BadInput(f"--storage {shown}: cannot connect to {where} ({reason}); check the server, "
                       f"host, port, user and database") from None  # fmt: skip
    finally:
        engine.dispose()


def _check_file_place(shown: str, path: Path) -> None:
    if not str(path) or path.is_dir():
        raise BadInput(f"--storage {shown}: {path or 'nothing'} is no file path; name the database file")
    if not path.parent.is_dir():
        raise BadInput(f"--storage {shown}: the directory {path.parent} does not exist; create it or choose another path")


def make_storage(url: str, heartbeat_seconds: int = 60) -> optuna.storages.BaseStorage:
    """``journal:PATH`` -> a journal file (shared filesystems); otherwise an SQLAlchemy URL
    (SQLite, PostgreSQL). Both with heartbeats every ``heartbeat_seconds`` and a grace period of
    twice that, after which a dead worker's trial is failed and re-queued."""
    grace = 2 * heartbeat_seconds
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(url[len("journal:") :])
        return _JournalStorage(backend, heartbeat_seconds, grace, _retry_callback())
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return _RDBStorage(url, heartbeat_interval=heartbeat_seconds, grace_period=grace, **{key: _retry_callback()})


def open_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Create the study, or continue it when it exists in ``storage``.

    A seeded sampler draws a stream of its own in each process: the seed is offset by the
    trials already in the study and by the worker number (``--workers``), so a rerun that
    continues a study, or workers started together, do not replay the same proposals. The
    first process of a new study uses the seed as given (reproducible)."""
    study = optuna.create_study(
        study_name=spec.name,
        storage=make_storage(storage or default_storage(spec), spec.heartbeat_seconds),
        directions=spec.directions,
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
        load_if_exists=True,
    )
    check_objectives(study, spec, storage or default_storage(spec))
    worker = int(os.environ.get("NESTAR_STUDY_WORKER", "0") or 0)
    stream = len(study.get_trials(deepcopy=False)) + 100_003 * worker
    if stream:
        study.sampler = spec.make_sampler(stream)
    return study


def check_objectives(study: optuna.Study, spec: StudySpec, storage: str) -> None:
    """The study in the storage must have been created for the study file's objectives (kept as a
    user attribute at creation): Optuna would otherwise load it as it was and fail every new trial
    only after training it (a changed count), or mix trials scored on other metrics (a renamed one).
    A study from before the attribute existed is checked on its directions, then given it."""
    wanted = [f"{o.metric} ({o.direction})" for o in spec.objectives]
    stored = study.user_attrs.get(OBJECTIVES_KEY)
    directions = [d.name.lower() for d in study.directions]
    if stored is None and directions == spec.directions:
        study.set_user_attr(OBJECTIVES_KEY, wanted)
    elif stored != wanted:
        raise ConfigError([f"objectives: study {spec.name!r} in {storage} was created for "
                           f"{stored or directions}; the study file now gives {wanted}, and trials scored "
                           f"differently cannot share a study: restore the objectives, or give the study a new "
                           f"name (name:)"])  # fmt: skip


def existing_study(spec: StudySpec, storage: str | None) -> optuna.Study | None:
    """The study in ``storage`` (default: the study directory's SQLite file), loaded without
    creating anything: ``None`` when the database or the study does not exist yet."""
    if storage is None:
        db = spec.study_dir / "study.db"
        if not db.is_file():
            return None
        storage = f"sqlite:///{db.resolve()}"
    elif storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return None
    elif storage.startswith("journal:") and not Path(storage[len("journal:"):]).is_file():
        return None
    try:
        study = optuna.load_study(study_name=spec.name, storage=make_storage(storage, spec.heartbeat_seconds))
    except KeyError:  # the database exists, this study not yet
        return None
    check_objectives(study, spec, storage)
    return study


def fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue) the RUNNING trials whose heartbeat expired."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def invalid(trial) -> bool:
    """A trial FAILed because its config (a combination of searched values) is invalid."""
    return trial.state == TrialState.FAIL and "invalid" in trial.user_attrs


def tally(study: optuna.Study) -> dict[str, int]:
    """Trials by what they mean for ``--trials``: finished (COMPLETE, PRUNED or invalid), running,
    waiting (queued arms and retries), errors (failed by an error), lost (a dead or interrupted
    worker's, or surplus)."""
    out = {"finished": 0, "running": 0, "waiting": 0, "errors": 0, "lost": 0, "invalid": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state in FINISHED or invalid(t):
            out["finished"] += 1
            out["invalid"] += invalid(t)
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        elif "error" in t.user_attrs:
            out["errors"] += 1
        else:
            out["lost"] += 1
    return out


def _retry_now(trial: optuna.Trial) -> None:
    """Re-queue a trial that stops without a result of its own (interrupted)."""
    frozen = trial.study._storage.get_trial(trial._trial_id)
    _retry_callback()(trial.study, frozen)
