"""A study's job: what every worker is given (the spec, where the study is stored, where its runs are tracked,
where its checkpoints go), with the defaults filled in: the study's SQLite file in ``mlruns/studies/`` and the
embedded MLflow store."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy

from ..config import ConfigError
from ..tracking import resolve_tracking_uri
from .spec import StudySpec

STUDIES_DIR = Path("mlruns") / "studies"
DEFAULT_HEARTBEAT_SECONDS = 10


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
    """Fills in the defaults: the study's SQLite file in ``mlruns/studies/`` and the embedded MLflow store."""
    heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS if heartbeat_interval is None else heartbeat_interval
    for option, value in (("--workers", workers), ("--heartbeat-interval", heartbeat_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option}: {value!r} is out of range; it must be an integer >= 1")
    return StudyJob(spec, normalize_storage_url(storage_url or default_storage_url(spec.name)),
                    resolve_tracking_uri(tracking_uri),
                    str(Path.cwd().resolve() / STUDIES_DIR / spec.name), heartbeat_interval, workers)


def default_storage_url(study_name: str) -> str:
    directory = Path.cwd().resolve() / STUDIES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / study_name}.db"


def normalize_storage_url(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, while
    this package depends on psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def redact(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
