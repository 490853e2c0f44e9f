"""A study's shared storage: opening it with heartbeats and a handler for the trials whose heartbeats stop
(marked FAIL, queued again), every call through the one retry policy (``sweepbench.retry``), the heartbeat
interval kept with the study, the one lock per storage, and the keys the study and its trials carry there. How
workers use all this is told in the docstring of ``coordination``.

**Connections.** A process holds no database connection between its storage calls (no pool), and its calls,
the heartbeat thread's included, take turns: a worker uses one connection at a time, plus the reservation lock's
for the milliseconds it is held, and waiting for that lock costs none (``job.worker_connections``). So workers
fit a PostgreSQL role's or database's ``CONNECTION LIMIT``: when every connection is taken, "too many
connections" is a transient fault, waited out under the retry policy."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import random
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import filelock
import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from ..config import ConfigError
from ..retry import RetryPolicy, ServiceUnavailable, causes, is_transient
from ..tracking import Store
from ..tracking.connect import sqlite_problem
from .job import STUDIES_DIR, StudyJob, check_storage_url, redact

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
WORKER_ATTR = "worker"
SEED_CLAIM_ATTR = "sampler_seed_claim"  # study user attrs "sampler_seed_claim.<trials>.<worker index>": host:pid
RETRY_HISTORY = "retry_history"
HEARTBEAT_ATTR = "heartbeat_interval"  # the first worker's interval, which every later worker uses
FAILURE_ATTR = "failure"  # "infrastructure" on a trial that failed for want of its storage or tracking store
INFRASTRUCTURE = "infrastructure"
GRACE_HEARTBEATS = 3
HEARTBEAT_RETRY_SECONDS = 0.5
MAX_RETRIES = 2


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks heartbeats, metric names and its matplotlib plots experimental, and warns when ask-and-tell
    meets heartbeats; none of that is news to a user of this module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


STORAGE_RETRY = RetryPolicy("study storage")
SQLITE_WRITE_ERRORS = ("readonly database", "unable to open database file", "Read-only file system",
                       "Permission denied")


def storage_policy(storage_url: str) -> RetryPolicy:
    """The retry policy for a storage: for a SQLite file, an error that a file or folder which cannot be written
    explains (``sqlite_problem``) is permanent and says which; "unable to open database file" alone is not."""
    if not storage_url.startswith("sqlite"):
        return STORAGE_RETRY

    def diagnose(exc: BaseException) -> str | None:
        if not any(text in str(error) for error in causes(exc) for text in SQLITE_WRITE_ERRORS):
            return None
        problem = sqlite_problem(storage_url)
        return problem and f"{redact(storage_url)} {problem}"

    return dataclasses.replace(STORAGE_RETRY, diagnose=diagnose)


def open_storage(job: StudyJob) -> RetryingStorage:
    """The study's storage, with no connection pool (see the module docstring). A SQLite file is then opened per
    call too, which costs little and sees the file as it is now: one whose file system went read-only reads as
    read-only, not as a write error on a handle opened before."""
    engine_kwargs: dict = {"poolclass": sqlalchemy.pool.NullPool}
    if job.storage_url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    policy = storage_policy(job.storage_url)
    with _quiet(), storage_lock(job.storage_url):
        storage = policy.call(
            RDBStorage, job.storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=job.heartbeat_interval,
            grace_period=GRACE_HEARTBEATS * job.heartbeat_interval, skip_compatibility_check=True,
            heartbeat_stale_trial_callback=StaleTrialHandler(job.tracking_uri))
        policy.call(check_schema, storage, job.storage_url)
    return RetryingStorage(storage, policy)


def check_schema(storage: RDBStorage, storage_url: str) -> None:
    """The tables' schema is this Optuna's, checked on one connection: Optuna's own check opens a second one while
    it holds one, which under the storage lock's would make three."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise ConfigError(f"--storage: {redact(storage_url)} holds Optuna tables of schema {current}, and Optuna "
                          f"{optuna.__version__} uses {head}; upgrade them (optuna storage upgrade --storage <url>) "
                          "or use the Optuna that made them")


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's RDB storage with every call under the retry policy: a database that restarts for a moment
    costs a pause, not a trial (``trial.report`` writes every epoch). The calls of one process, the heartbeat
    thread's too, take turns (``turn``), so that the process uses one connection at a time."""

    def __init__(self, storage: RDBStorage, policy: RetryPolicy = STORAGE_RETRY) -> None:
        self.raw, self.policy = storage, policy
        self.turn = threading.RLock()

    def one_try(self, name: str, *args, **kwargs):
        """One call of the storage's method ``name``, in this process's turn."""
        with self.turn:
            return getattr(self.raw, name)(*args, **kwargs)

    def beat(self, trial_ids: Sequence[int]) -> None:
        """One try at recording the trials' heartbeats: the heartbeat thread skips a beat rather than wait."""
        for trial_id in trial_ids:
            self.one_try("record_heartbeat", trial_id)


def _retried(name: str):
    def method(self: RetryingStorage, *args, **kwargs):
        return self.policy.call(self.one_try, name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in (*BaseStorage.__abstractmethods__, *BaseHeartbeat.__abstractmethods__, "get_trial_id_from_study_id_"
              "trial_number", "get_trial_number_from_id", "get_best_trial", "get_n_trials", "get_trial_param",
              "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "check_trial_is_updatable",
              "remove_session", "get_failed_trial_callback"):
    setattr(RetryingStorage, _name, _retried(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def adopt_heartbeat_interval(job: StudyJob, study: optuna.Study) -> StudyJob:
    """The job with the study's heartbeat interval: the first worker's, stored with the study, so workers
    started with other intervals do not mistake each other for dead ones."""
    with storage_lock(job.storage_url):
        stored = study.user_attrs.get(HEARTBEAT_ATTR)
        if stored is None:
            study.set_user_attr(HEARTBEAT_ATTR, job.heartbeat_interval)
            return job
    if stored != job.heartbeat_interval:
        log.warning(f"heartbeat interval: using the study's {stored} s, not {job.heartbeat_interval} s")
    return dataclasses.replace(job, heartbeat_interval=int(stored))


def open_existing_study(name: str, storage_url: str | None = None) -> optuna.Study:
    """Loads a study for reading, creating nothing. The error lists the studies the storage holds; for the default
    storage (one SQLite file per study in ``mlruns/studies/``), the studies in all of its files."""
    if storage_url:
        url = check_storage_url(storage_url, must_hold="the study")
        studies, where = dict.fromkeys(stored_study_names(url), url), redact(storage_url)
    else:
        studies, where = default_studies(), f"{STUDIES_DIR}/ (the default storage: one SQLite file per study)"
    if name not in studies:
        hint = "" if storage_url else "; give --storage for a study stored elsewhere"
        raise ConfigError(f"study: no study {name!r} in {where}; studies there: {', '.join(studies) or 'none'}{hint}")
    with _quiet():
        return optuna.load_study(study_name=name, storage=studies[name])


def default_studies() -> dict[str, str]:
    """Study name -> storage URL, for every study in the SQLite files of ``mlruns/studies/``, by name."""
    urls = [f"sqlite:///{path.resolve()}" for path in sorted((Path.cwd() / STUDIES_DIR).glob("*.db"))]
    return dict(sorted({name: url for url in reversed(urls) for name in stored_study_names(url)}.items()))


def stored_study_names(url: str) -> list[str]:
    """The studies a storage holds, read without creating anything (no tables in an empty database); a file that
    is not an Optuna storage holds none. ``url`` must name an existing file or a database that opens."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not sqlalchemy.inspect(connection).has_table("studies"):
                return []
            return sorted(connection.execute(sqlalchemy.text("SELECT study_name FROM studies")).scalars())
    except sqlalchemy.exc.DatabaseError:
        return []
    finally:
        engine.dispose()


ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sweepbench.study").digest()[:8], "big", signed=True)
LOCK_FIRST_WAIT, LOCK_LONGEST_WAIT = 0.02, 0.25  # seconds between tries for a lock another process holds


@contextlib.contextmanager
def storage_lock(storage_url: str) -> Iterator[None]:
    """One lock per storage, held for milliseconds: around creating its tables (two workers starting on an empty
    database would both create them) and around each trial reservation (see the docstring of ``coordination``)."""
    url = sqlalchemy.engine.make_url(storage_url)
    if url.get_backend_name() == "postgresql":
        connection = _advisory_lock(storage_url)
        try:
            yield
        finally:
            _advisory_unlock(connection)
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    path = Path(f"{database}.lock") if database else Path.cwd() / STUDIES_DIR / "storage.lock"
    lock = filelock.FileLock(str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:  # a read-only file system, say: the lock file cannot be opened for writing
        permanent = storage_policy(storage_url).permanent(exc)
        if permanent is None:
            raise
        raise permanent from exc
    try:
        yield
    finally:
        lock.release()


@functools.lru_cache(maxsize=4)
def _lock_engine(storage_url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)


def _advisory_lock(storage_url: str) -> sqlalchemy.engine.Connection:
    """A connection holding the storage's advisory lock, a session lock: it lasts as long as the connection.
    Taken with ``pg_try_advisory_lock``, each try on a new connection that is closed again while another process
    holds the lock: waiting costs no connection, which the holder may need under a ``CONNECTION LIMIT``. Each try
    is under the retry policy (a server that is down is waited for within its budget); waiting for the holder
    has no limit, as ``pg_advisory_lock``'s has none."""
    wait = LOCK_FIRST_WAIT
    while True:
        connection = STORAGE_RETRY.call(_try_advisory_lock, storage_url)
        if connection is not None:
            return connection
        time.sleep(random.uniform(0.5, 1.5) * wait)  # jitter: waiting workers do not try in step
        wait = min(2 * wait, LOCK_LONGEST_WAIT)


def _try_advisory_lock(storage_url: str) -> sqlalchemy.engine.Connection | None:
    """A connection holding the advisory lock, or None (and no connection) while another session holds it."""
    connection = _lock_engine(storage_url).connect()
    try:
        taken = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"),
                                   {"key": ADVISORY_LOCK_KEY}).scalar()
    except BaseException:
        connection.close()
        raise
    if not taken:
        connection.close()
        return None
    return connection


def _advisory_unlock(connection: sqlalchemy.engine.Connection) -> None:
    """Releases the advisory lock. A connection the server dropped meanwhile (a restart) has nothing to release:
    its session, and the lock with it, ended on the server."""
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
    except Exception as exc:
        if not is_transient(exc):
            raise
    finally:
        connection.close()


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retries: int | None = MAX_RETRIES) -> bool:
    """Queues a trial that did not end on its own (dead worker, Ctrl-C) to run again with the same parameters,
    at most ``max_retries`` times (None: always, for failures of the infrastructure). Optuna's own retry
    callback copies the user attributes too (the old MLflow run id, the error); this one keeps only the
    parameters and the retry history."""
    history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
    if max_retries is not None and len(history) > max_retries:
        return False
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions,
                                              system_attrs={RETRY_HISTORY: history}))
    return True


class StaleTrialHandler:
    """Called by Optuna for a RUNNING trial whose heartbeats stopped (now FAIL): closes its MLflow child run as
    FAILED and queues it again."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            try:
                Store(self.tracking_uri).fail_run(run_id, "its worker stopped sending heartbeats (killed?)")
            except ServiceUnavailable:
                pass  # left RUNNING: the next ``study run`` reconciles it with the trial's state
        retried = retry_trial(study, trial)
        log.warning(f"trial {trial.number}: its worker stopped sending heartbeats; marked FAIL"
                    + (", queued again" if retried else f", not retried ({MAX_RETRIES} retries used)"))


@contextlib.contextmanager
def _heartbeat(storage: RetryingStorage, trial_ids: Sequence[int], interval: int) -> Iterator[None]:
    """Records the trials' heartbeats every ``interval`` seconds, as ``Study.optimize`` does. A database that is
    busy or down for a moment costs beats, not the thread (a silent thread would make a live trial look dead). A
    permanent error ends the beats quietly: the trial's own next call ends the worker, in one line."""
    stop = threading.Event()

    def beat() -> None:
        wait = interval
        while not stop.wait(wait):
            try:
                storage.beat(trial_ids)
                wait = interval
            except Exception as exc:
                if storage.policy.permanent(exc) is not None:
                    return
                if not is_transient(exc):
                    raise
                wait = min(interval, HEARTBEAT_RETRY_SECONDS)  # beat again as soon as the storage is back

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
