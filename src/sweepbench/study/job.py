"""A study's job: what every worker is given (the spec, where the study is stored, where its runs are tracked,
where its checkpoints go), with the defaults filled in: the study's SQLite file in ``mlruns/studies/`` and the
embedded MLflow store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..paths import writable_folder
from ..tracking import resolve_tracking_uri
from ..tracking.connect import database_problem, redact, sqlite_problem, with_installed_driver
from .spec import StudySpec

STUDIES_DIR = Path("mlruns") / "studies"
DEFAULT_HEARTBEAT_SECONDS = 10
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
STORAGE_ALLOWED = "sqlite:///<file>, postgresql://<user>@<host>/<database> or mysql://<user>@<host>/<database>"


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker process needs to work on a study: picklable, so spawned workers get it whole."""

    spec: StudySpec
    storage_url: str
    tracking_uri: str
    checkpoint_root: str
    heartbeat_interval: int = DEFAULT_HEARTBEAT_SECONDS
    workers: int = 1


def make_job(spec: StudySpec, storage_url: str | None = None, tracking_uri: str | None = None,
             workers: int = 1, heartbeat_interval: int | None = None) -> StudyJob:
    """Fills in the defaults (the study's SQLite file in ``mlruns/studies/``, the embedded MLflow store, the
    checkpoints beside the study's file unless the spec sets ``checkpoint_dir``) and checks, creating nothing,
    that the storage opens and the checkpoint folder can be written."""
    heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS if heartbeat_interval is None else heartbeat_interval
    for option, value in (("--workers", workers), ("--heartbeat-interval", heartbeat_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option}: {value!r} is out of range; it must be an integer >= 1")
    storage_url = check_storage_url(storage_url or default_storage_url(spec.name))
    checkpoint_root = spec.base_config.checkpoint_dir or str(Path.cwd().resolve() / STUDIES_DIR / spec.name)
    writable_folder("checkpoint_dir", checkpoint_root)
    return StudyJob(spec, storage_url, resolve_tracking_uri(tracking_uri), checkpoint_root, heartbeat_interval,
                    workers)


def default_storage_url(study_name: str) -> str:
    """``sqlite:///<cwd>/mlruns/studies/<name>.db``; its folder is made when the study is first stored."""
    return f"sqlite:///{Path.cwd().resolve() / STUDIES_DIR / study_name}.db"


def check_storage_url(url: str, must_hold: str | None = None) -> str:
    """``url`` with the installed driver, checked before any work: a scheme Optuna stores studies in, and a SQLite
    file that exists or can be made (``must_hold``, what it must hold: one that exists) or a database server that
    opens it within a few seconds. The error names the URL, password hidden."""
    scheme = url.partition(":")[0].split("+")[0].lower()
    if "://" not in url or scheme not in STORAGE_SCHEMES:
        problem = f"is not a storage URL Optuna can use; use {STORAGE_ALLOWED}"
    elif scheme == "sqlite":
        problem = sqlite_problem(url, must_hold)
    else:
        problem = database_problem(url)
    if problem:
        raise ConfigError(f"--storage: {redact(url)} {problem}")
    return normalize_storage_url(url)


def normalize_storage_url(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed (see ``tracking.connect``)."""
    return with_installed_driver(url)
