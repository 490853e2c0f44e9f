"""A study's job: what every worker is given (the spec, where the study is stored, where its runs are tracked,
where its checkpoints go), with the defaults filled in: the study's SQLite file in ``mlruns/studies/`` and the
embedded MLflow store."""

from __future__ import annotations

import os
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy

from ..config import ConfigError, SettingWarning
from ..paths import writable_folder
from ..tracking import resolve_tracking_uri
from ..tracking.connect import database_problem, redact, sqlite_problem, with_installed_driver
from .spec import StudySpec

STUDIES_DIR = Path("mlruns") / "studies"
DEFAULT_HEARTBEAT_SECONDS = 10
WORKERS_PER_CORE = 4
MIN_WORKER_CAP = 8
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "grpc")
STORAGE_ALLOWED = ("sqlite:///<file>, postgresql://<user>@<host>/<database>, mysql://<user>@<host>/<database> or "
                   "grpc://<host>:<port> (sweepbench storage serve)")
PROXY_CONNECT_SECONDS = 5


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker process needs to work on a study: picklable, so spawned workers get it whole."""

    spec: StudySpec
    storage_url: str
    tracking_uri: str
    checkpoint_root: str
    heartbeat_interval: int = DEFAULT_HEARTBEAT_SECONDS
    workers: int = 1
    new_spec_version: bool = False  # record a changed spec as the study's next version (``identity``)
    spec_version: int | None = None  # the version this job works under, once the study is loaded
    system_metrics: bool = True  # MLflow's system metrics on the parent run (``tracking.system``)
    comparison: str | None = None  # the sampler comparison this study belongs to (``compare``): its experiment
    comparison_run_id: str | None = None  # the comparison's parent run, this study's parent run's parent

    @property
    def experiment(self) -> str:
        """The MLflow experiment of the study's runs: the study's name, or its comparison's."""
        return self.comparison or self.spec.name


def make_job(spec: StudySpec, storage_url: str | None = None, tracking_uri: str | None = None,
             workers: int = 1, heartbeat_interval: int | None = None, new_spec_version: bool = False,
             system_metrics: bool = True, comparison: str | None = None) -> StudyJob:
    """Fills in the defaults (the study's SQLite file in ``mlruns/studies/``, the embedded MLflow store, the
    checkpoints beside the study's file unless the spec sets ``checkpoint_dir``) and checks, creating nothing,
    that the storage opens, the checkpoint folder can be written and the workers fit this machine."""
    heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS if heartbeat_interval is None else heartbeat_interval
    for option, value in (("--workers", workers), ("--heartbeat-interval", heartbeat_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option}: {value!r} is out of range; it must be an integer >= 1")
    check_workers(workers)
    storage_url = check_storage_url(storage_url or default_storage_url(spec.name))
    # absolute, so that a trial's recorded checkpoint names the same file from any folder (study export)
    checkpoint_root = str(Path(spec.base_config.checkpoint_dir or Path.cwd() / STUDIES_DIR / spec.name).resolve())
    writable_folder("checkpoint_dir", checkpoint_root)
    return StudyJob(spec, storage_url, resolve_tracking_uri(tracking_uri), checkpoint_root, heartbeat_interval,
                    workers, new_spec_version, system_metrics=system_metrics, comparison=comparison)


def max_workers() -> int:
    """The most local workers one ``study run`` starts: each is a process with its own copy of torch and the
    data (some hundred MB), so a few per core; more machines share a study through one ``--storage``."""
    return max(MIN_WORKER_CAP, WORKERS_PER_CORE * (os.cpu_count() or 1))


def check_workers(workers: int) -> None:
    """Refuses a number of workers this machine cannot hold; warns past one per core (they share the cores)."""
    cores = os.cpu_count() or 1
    if workers > max_workers():
        raise ConfigError(f"--workers: {workers} is out of range; this machine runs at most {max_workers()} local "
                          f"workers ({cores} CPU core(s)); to use more machines, run `sweepbench study run` on each "
                          "with the same --storage")
    if workers > cores:
        warnings.warn(f"--workers: {workers} workers share {cores} CPU core(s); each trains slower, and the study "
                      "may not finish sooner", SettingWarning, stacklevel=2)


def default_storage_url(study_name: str) -> str:
    """``sqlite:///<cwd>/mlruns/studies/<name>.db``; its folder is made when the study is first stored."""
    return f"sqlite:///{Path.cwd().resolve() / STUDIES_DIR / study_name}.db"


def check_storage_url(url: str, must_hold: str | None = None) -> str:
    """``url`` with the installed driver, checked before any work: a scheme Optuna stores studies in, and a SQLite
    file that can be written or made (``must_hold``, what it must hold, for a command that only reads: one that
    exists) or a database server that opens it within a few seconds and, for a command that writes, lets its user
    open the connections a worker needs at once (``worker_connections``). The error names the URL, password
    hidden."""
    scheme = url.partition(":")[0].split("+")[0].lower()
    if "://" not in url or scheme not in STORAGE_SCHEMES:
        problem = f"is not a storage URL Optuna can use; use {STORAGE_ALLOWED}"
    elif scheme == "sqlite":
        problem = sqlite_problem(url, must_hold)
    elif scheme == "grpc":
        problem = proxy_problem(url)
    else:
        problem = database_problem(url, None if must_hold else worker_connections)
    if problem:
        raise ConfigError(f"--storage: {redact(url)} {problem}")
    return normalize_storage_url(url)


def proxy_address(url: str) -> tuple[str, int]:
    """The host and port of a ``grpc://HOST:PORT`` storage URL; ValueError when it has no port."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname or parsed.port is None or parsed.path not in ("", "/"):
        raise ValueError(url)
    return parsed.hostname, parsed.port


def proxy_problem(url: str) -> str | None:
    """What is wrong with a ``grpc://`` storage URL: no host and port, or no proxy answering there in time."""
    try:
        host, port = proxy_address(url)
    except ValueError:
        return "is not a gRPC storage proxy URL; use grpc://<host>:<port>, the address of `sweepbench storage serve`"
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=PROXY_CONNECT_SECONDS)
        except grpc.FutureTimeoutError:
            return (f"does not answer within {PROXY_CONNECT_SECONDS} s: is `sweepbench storage serve` running "
                    f"there, and reachable from this machine?")
    return None


def worker_connections(connection: sqlalchemy.engine.Connection) -> tuple[int, str]:
    """How many connections a study worker needs at once on the database of ``connection``, and why: one for a
    storage call and one for the reservation lock (see ``storage``); to create the storage's tables, Optuna's
    set-up opens a second connection while it holds one, so the worker that does it needs three."""
    if sqlalchemy.inspect(connection).has_table("alembic_version"):
        return 2, "a study worker (one connection for a storage call, one for the reservation lock)"
    return 3, ("a study worker that creates the storage's tables (two connections for Optuna's set-up, one for the "
               "reservation lock)")


def normalize_storage_url(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed (see ``tracking.connect``)."""
    return with_installed_driver(url)
