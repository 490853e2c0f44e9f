"""The one place that speaks to MLflow: where runs go, experiments, and the life of a run.

The embedded store is SQLite in ``<project>/mlruns/mlflow.db`` with artifacts beside it (MLflow 3 refuses the
``./mlruns`` file store). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point the same code at a tracking server.
``Store`` talks to it through an explicit ``MlflowClient``, never the fluent active-run API, so several
writers, processes and nested child runs can share one store. Every run it creates carries the run schema's
``sweepbench.kind`` tag (see ``schema``), and every run it starts ends FINISHED, FAILED or KILLED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ..retry import RetryPolicy
from ..status import MlflowStatus
from .schema import KIND_TAG

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORE_DIR = "mlruns"
STORE_DB = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOCAL_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
MAX_MESSAGE_LENGTH = 5000
PARENT_RUN_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag marks it as a model-training experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
BATCH_SIZE = 100
SEARCH_LIMIT = 50_000  # MLflow's most runs per search


def default_store_path() -> Path:
    """The embedded store's SQLite file, ``<cwd>/mlruns/mlflow.db`` (not created here)."""
    return Path.cwd().resolve() / STORE_DIR / STORE_DB


def default_tracking_uri() -> str:
    return f"sqlite:///{default_store_path()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()


def uri_scheme(tracking_uri: str) -> str:
    return tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()


def is_server(tracking_uri: str) -> bool:
    return uri_scheme(tracking_uri) in ("http", "https")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if uri_scheme(tracking_uri) != "sqlite" or ":///" not in tracking_uri:
        return None
    return Path(tracking_uri.split(":///", 1)[1].split("?", 1)[0]).resolve()


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, under the project's ``mlruns/`` for
    another database, and wherever the server decides for a tracking server (None)."""
    database = sqlite_path(tracking_uri)
    if database is not None:
        return (database.parent / ARTIFACTS_DIR).as_uri()
    if uri_scheme(tracking_uri) in LOCAL_DATABASE_SCHEMES:
        return (Path.cwd().resolve() / STORE_DIR / ARTIFACTS_DIR).as_uri()
    return None


def as_metrics(values: dict[str, float | None], step: int) -> list[Metric]:
    """``values`` as MLflow metrics at ``step``, one timestamp for all; None values are left out."""
    timestamp = int(time.time() * 1000)
    return [Metric(key, float(value), timestamp, step) for key, value in values.items() if value is not None]


def _batched(items: list, size: int = BATCH_SIZE) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _message(text: str) -> str:
    return text[:MAX_MESSAGE_LENGTH]


TRACKING_RETRY = RetryPolicy("MLflow tracking store")
# MLflow's own HTTP retries would wait about 4 minutes before ``TRACKING_RETRY`` (which logs the incident and
# tells a trial's outage from its failure) sees an error: a few quick tries instead. Its request timeout (120 s) is
# kept: artifact uploads go through it. Set in the environment, they win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        # MLflow prints "View run ..." to stdout as it ends a run: into a closed pipe
                        # (``| head``), that BrokenPipeError would replace Ctrl-C and fail the trial.
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
for _name, _value in MLFLOW_HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


# Writes that MLflow makes by looking a row up and inserting it when missing: two processes making the same one at
# once (a study's workers logging a new dataset, tagging the experiment) both insert, and one fails on the key.
UPSERTS = frozenset({"log_inputs", "set_experiment_tag"})
DUPLICATE_KEY_TEXTS = ("IntegrityError", "UniqueViolation", "UNIQUE constraint failed", "duplicate key",
                       "Duplicate entry")  # SQLite, PostgreSQL and MySQL through SQLAlchemy, locally or via a server


class RetryingClient:
    """An ``MlflowClient`` whose every call goes through the retry policy (``sweepbench.retry``); an upsert that
    lost its insert to another process is made once more, and then finds that process's row."""

    def __init__(self, client: MlflowClient) -> None:
        self.mlflow = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.mlflow, name)
        if not callable(attribute):
            return attribute
        if name in UPSERTS:
            return functools.partial(upsert, attribute)
        return functools.partial(TRACKING_RETRY.call, attribute)


def upsert(write: Callable[..., Any], *args, **kwargs) -> Any:
    try:
        return TRACKING_RETRY.call(write, *args, **kwargs)
    except MlflowException as exc:
        if not any(text in str(exc) for text in DUPLICATE_KEY_TEXTS):
            raise
        return TRACKING_RETRY.call(write, *args, **kwargs)


@dataclass
class RunOutcome:
    """What a ``Store.lifecycle`` block decides about its run: the final status if it ends normally (FINISHED
    unless the block says otherwise) and tags to set with it."""

    status: str = MlflowStatus.FINISHED
    tags: dict[str, str] = field(default_factory=dict)


class Store:
    """One MLflow tracking store (a SQLite file, a database or a tracking server)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)

    @functools.cached_property
    def client(self) -> RetryingClient:
        """Made on first use, with a SQLite file's folder: a store no run is written to is never created."""
        database = sqlite_path(self.tracking_uri)
        if database is None:
            return self._connect()
        return self._sqlite_client(database)

    def _connect(self) -> RetryingClient:
        """A new client, under the retry policy too: MLflow opens the store and checks its schema as it makes
        one, and a SQLite file whose write lock a paused process holds answers "database is locked" then."""
        return RetryingClient(TRACKING_RETRY.call(MlflowClient, self.tracking_uri))

    def _sqlite_client(self, database: Path) -> RetryingClient:
        """A client whose SQLite store exists with MLflow's current schema. MLflow creates and migrates the schema
        on a store's first use; two processes doing that at once on a fresh file break each other ("table
        already exists", alembic's "expected to match one row"), so the first use happens under a file lock
        beside the database (not ``<database>.lock``, the study storage's lock when a study's Optuna storage is
        this same file: taken again inside it, it would wait for ever)."""
        import filelock

        database.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{database}.schema.lock"):
            client = self._connect()
            client.search_experiments(max_results=1)
        return client

    # ---- experiments ----------------------------------------------------------------------------------------

    def experiment(self, name: str, description: str | None = None) -> str:
        """The id of experiment ``name``, created (or restored) when needed, marked as a model-training
        experiment for the UI, with ``description`` as its note when given."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=artifact_root(self.tracking_uri))
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)  # another process created it first
                if experiment is None:
                    raise
        if experiment is not None:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        tags = {} if experiment is None else experiment.tags
        if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if description and tags.get(DESCRIPTION_TAG) != description:
            self.client.set_experiment_tag(experiment_id, DESCRIPTION_TAG, description)
        return experiment_id

    def experiment_names(self) -> dict[str, str]:
        """Experiment id -> name, for every experiment in the store."""
        return {experiment.experiment_id: experiment.name for experiment in self.client.search_experiments()}

    # ---- runs -----------------------------------------------------------------------------------------------

    def start_run(self, experiment_id: str, name: str, kind: str, tags: dict[str, str] | None = None,
                  params: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        """A new RUNNING run of ``kind`` (a ``schema`` kind) with its tags and params; returns its id."""
        all_tags = {**(tags or {}), KIND_TAG: kind}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run_id = self.client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id
        if params:
            self.log(run_id, params=params)
        return run_id

    def log(self, run_id: str, metrics: dict[str, float | None] | list[Metric] | None = None,
            params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Metrics (a dict at ``step``, or ready ``Metric``s), params and tags, in as few requests as MLflow
        allows (at most 100 params per batch)."""
        if isinstance(metrics, dict):
            metrics = as_metrics(metrics, step)
        param_list = [Param(key, str(value)) for key, value in (params or {}).items()]
        tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=metrics or [], params=param_list[:BATCH_SIZE], tags=tag_list)
        for batch in _batched(param_list[BATCH_SIZE:]):
            self.client.log_batch(run_id, params=batch)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, values: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, values, artifact_file)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Logs a matplotlib figure as PNG, then closes it (open figures pile up in a long study)."""
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def end_run(self, run_id: str, status: str, tags: dict[str, str] | None = None, name: str | None = None) -> None:
        """Sets ``tags`` (messages cut to MLflow's limit) and a new ``name``, then the run's terminal status."""
        if tags:
            self.log(run_id, tags={key: _message(value) for key, value in tags.items()})
        if name:
            self.client.update_run(run_id, name=name)
        self.client.set_terminated(run_id, status)

    def fail_run(self, run_id: str, message: str) -> None:
        self.end_run(run_id, MlflowStatus.FAILED, {"error": message})

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def reopen(self, run_id: str) -> bool:
        """Marks an existing run RUNNING again (a resumed study); False when the store has no such run."""
        if not self.run_exists(run_id):
            return False
        self.client.update_run(run_id, status=MlflowStatus.RUNNING)
        return True

    def experiment_id_of(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.experiment_id

    def child_runs(self, experiment_ids: list[str], parent_run_id: str) -> list[Any]:
        """The runs of these experiments under ``parent_run_id``."""
        query = f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
        return list(self.client.search_runs(experiment_ids, query, max_results=SEARCH_LIMIT))

    @contextlib.contextmanager
    def lifecycle(self, run_id: str) -> Iterator[RunOutcome]:
        """Ends ``run_id`` when the block ends: KILLED on Ctrl-C or SIGTERM, FAILED (with the error) when it
        raises, else the outcome's status (FINISHED unless the block set another)."""
        from ..engine import interrupt_message

        outcome = RunOutcome()
        try:
            yield outcome
        except KeyboardInterrupt as interrupt:
            self.end_run(run_id, MlflowStatus.KILLED, {"stop_reason": interrupt_message(interrupt)})
            raise
        except BaseException as exc:
            self.end_run(run_id, MlflowStatus.FAILED, {"error": f"{type(exc).__name__}: {exc}"})
            raise
        self.end_run(run_id, outcome.status, outcome.tags)


def ensure_experiment(name: str, tracking_uri: str | None = None, description: str | None = None) -> str:
    """``Store(tracking_uri).experiment(name, description)``: the experiment's id, created when needed."""
    return Store(tracking_uri).experiment(name, description)
