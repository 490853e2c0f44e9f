"""A study's shared storage: opening it with heartbeats and a handler for the trials whose heartbeats stop
(marked FAIL, queued again), every call through the one retry policy (``sweepbench.retry``), the heartbeat
interval kept with the study, the one lock per storage, and the keys the study and its trials carry there. How
workers use all this is told in the docstring of ``coordination``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
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
from ..retry import RetryPolicy, ServiceUnavailable, is_transient
from ..tracking import Store
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


def open_storage(job: StudyJob) -> RetryingStorage:
    sqlite = job.storage_url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    with _quiet(), storage_lock(job.storage_url):
        storage = STORAGE_RETRY.call(
            RDBStorage, job.storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=job.heartbeat_interval,
            grace_period=GRACE_HEARTBEATS * job.heartbeat_interval,
            heartbeat_stale_trial_callback=StaleTrialHandler(job.tracking_uri))
    return RetryingStorage(storage)


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's RDB storage with every call under the retry policy: a database that restarts for a moment
    costs a pause, not a trial (``trial.report`` writes every epoch). ``raw`` is the storage itself, for the
    heartbeat thread, which skips a beat rather than wait."""

    def __init__(self, storage: RDBStorage) -> None:
        self.raw = storage


def _retried(name: str):
    def method(self: RetryingStorage, *args, **kwargs):
        return STORAGE_RETRY.call(getattr(self.raw, name), *args, **kwargs)

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


@contextlib.contextmanager
def storage_lock(storage_url: str) -> Iterator[None]:
    """One lock per storage, held for milliseconds: around creating its tables (two workers starting on an empty
    database would both create them) and around each trial reservation (see the docstring of ``coordination``)."""
    url = sqlalchemy.engine.make_url(storage_url)
    if url.get_backend_name() == "postgresql":
        connection = STORAGE_RETRY.call(_advisory_lock, storage_url)
        try:
            yield
        finally:
            _advisory_unlock(connection)
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    path = Path(f"{database}.lock") if database else Path.cwd() / STUDIES_DIR / "storage.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path)):
        yield


@functools.lru_cache(maxsize=4)
def _lock_engine(storage_url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(storage_url, pool_size=1, pool_pre_ping=True)


def _advisory_lock(storage_url: str) -> sqlalchemy.engine.Connection:
    """A connection holding the storage's advisory lock, a session lock: it lasts as long as the connection."""
    connection = _lock_engine(storage_url).connect()
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    except BaseException:
        connection.close()
        raise
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
    busy or down for a moment costs beats, not the thread (a silent thread would make a live trial look dead)."""
    stop = threading.Event()

    def beat() -> None:
        wait = interval
        while not stop.wait(wait):
            try:
                for trial_id in trial_ids:
                    storage.raw.record_heartbeat(trial_id)
                wait = interval
            except Exception as exc:
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
