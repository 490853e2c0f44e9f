"""Opening a study's storage (a SQLite file, a database server, or Optuna's gRPC proxy in front of one) under the
retry policy, and finding the studies a storage holds."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Iterator

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from ...config import ConfigError
from ..job import STUDIES_DIR, StudyJob, check_storage_url, redact
from .keys import GRACE_HEARTBEATS, HEARTBEAT_ATTR
from .heartbeat import ProgressHeartbeat
from .locks import MUTEX_STUDY, storage_lock
from .policy import STORAGE_RETRY, storage_policy
from .proxy import grpc_proxy, is_proxy
from .retrying import RetryingStorage
from .stale import StaleTrialHandler

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks heartbeats, metric names and its matplotlib plots experimental, and warns when ask-and-tell
    meets heartbeats; none of that is news to a user of this module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield



def open_storage(job: StudyJob) -> RetryingStorage:
    """The study's storage, with no connection pool (see the module docstring). A SQLite file is then opened per
    call too, which costs little and sees the file as it is now: one whose file system went read-only reads as
    read-only, not as a write error on a handle opened before. Through the gRPC proxy, heartbeats are kept as
    trial attributes (``heartbeat.ProgressHeartbeat``): the proxy passes Optuna's own on to no one."""
    if is_proxy(job.storage_url):
        heartbeat = ProgressHeartbeat(grpc_proxy(job.storage_url), job.heartbeat_interval,
                                      GRACE_HEARTBEATS * job.heartbeat_interval, StaleTrialHandler(job.tracking_uri))
        return RetryingStorage(grpc_proxy(job.storage_url), STORAGE_RETRY, heartbeat)
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
        return optuna.load_study(study_name=name, storage=reader(studies[name]))


def reader(storage_url: str) -> str | optuna.storages.BaseStorage:
    """What ``optuna.load_study`` reads a study from: the URL of a database, a client of a gRPC proxy."""
    return grpc_proxy(storage_url) if is_proxy(storage_url) else storage_url


def default_studies() -> dict[str, str]:
    """Study name -> storage URL, for every study in the SQLite files of ``mlruns/studies/``, by name."""
    urls = [f"sqlite:///{path.resolve()}" for path in sorted((Path.cwd() / STUDIES_DIR).glob("*.db"))]
    return dict(sorted({name: url for url in reversed(urls) for name in stored_study_names(url)}.items()))


def stored_study_names(url: str) -> list[str]:
    """The studies a storage holds, read without creating anything (no tables in an empty database); a file that
    is not an Optuna storage holds none. ``url`` must name an existing file or a database that opens, or a gRPC
    proxy that answers. The proxy's lock (``locks.MUTEX_STUDY``) is no study."""
    if is_proxy(url):
        names = [study.study_name for study in STORAGE_RETRY.call(grpc_proxy(url).get_all_studies)]
        return sorted(name for name in names if name != MUTEX_STUDY)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not sqlalchemy.inspect(connection).has_table("studies"):
                return []
            query = sqlalchemy.text("SELECT study_name FROM studies WHERE study_name != :lock")
            return sorted(connection.execute(query, {"lock": MUTEX_STUDY}).scalars())
    except sqlalchemy.exc.DatabaseError:
        return []
    finally:
        engine.dispose()

