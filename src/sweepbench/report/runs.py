"""Runs read back from MLflow as a table, and the value of a key for every run whatever its kind.

Runs are read through the tracking layer's client, so a report works the same against the embedded SQLite store
and a tracking server. Only runs that train are read unless other kinds are asked for (see
``tracking.schema``): a study's or a benchmark's parent and a benchmark cell summarise runs that are already
in the table, and mixing them in would count those runs twice.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from ..validators import ConfigError, choice, choices
from ..status import PRUNED_REPORT_STATUS, MlflowStatus, RunStatus, report_status
from ..tracking import RUN_KINDS, TRAINING_KINDS, Store, run_kind
from ..tracking.schema import FUSED_TAG

RUN_STATUSES = (*MlflowStatus, PRUNED_REPORT_STATUS, "all")
RUN_ATTRIBUTES = ("run_id", "run_name", "experiment", "status", "kind")
SEARCH_PAGE_SIZE = 1000
MISSING = "-"


def _experiment_ids(store: Store, names: Sequence[str] | None) -> dict[str, str]:
    experiments = store.experiment_names()
    if not names:
        return experiments
    by_name = {name: experiment_id for experiment_id, name in experiments.items()}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ConfigError(f"experiment: {missing} not found; experiments in the store: "
                          f"{', '.join(sorted(by_name)) or 'none'}")
    return {by_name[name]: name for name in names}


def _run_row(run: Any, experiments: dict[str, str]) -> dict[str, Any]:
    row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
           "experiment": experiments[run.info.experiment_id],
           "status": report_status(run.info.status, run.data.tags.get("status")),
           "kind": run_kind(run.data.tags)}
    row.update({f"params.{key}": value for key, value in run.data.params.items()})
    row.update({f"tags.{key}": value for key, value in run.data.tags.items()})
    row.update({f"metrics.{key}": value for key, value in run.data.metrics.items()})
    return row


def load_runs(tracking_uri: str, experiments: Sequence[str] | None = None, filter_string: str = "",
              status: str = MlflowStatus.FINISHED, kinds: Sequence[str] = TRAINING_KINDS) -> pd.DataFrame:
    """One row per run of ``kinds`` with ``status`` (MLflow's, or ``PRUNED``: pruned trials, which are neither
    FINISHED nor KILLED here): its attributes (``kind`` among them), ``params.*``, ``tags.*`` and the latest
    ``metrics.*``."""
    from mlflow.exceptions import MlflowException

    choice("status", status, RUN_STATUSES)
    choices("kind", kinds, RUN_KINDS)
    store = Store(tracking_uri)
    experiment_names = _experiment_ids(store, experiments)
    clauses = [filter_string] if filter_string else []
    if status == PRUNED_REPORT_STATUS:
        clauses.append(f"tags.status = '{RunStatus.PRUNED}'")
    elif status != "all":
        clauses.append(f"attributes.status = '{status}'")
    rows, page_token = [], None
    while True:
        try:
            page = store.client.search_runs(list(experiment_names), " and ".join(clauses),
                                            max_results=SEARCH_PAGE_SIZE, page_token=page_token)
        except MlflowException as exc:
            raise ConfigError(f"filter: {filter_string!r} rejected by MLflow: {exc.message}") from exc
        rows += [row for row in (_run_row(run, experiment_names) for run in page)
                 if row["kind"] in kinds and status in ("all", row["status"])]
        page_token = page.token
        if not page_token:
            return pd.DataFrame(rows, columns=None if rows else list(RUN_ATTRIBUTES))


def key_columns(key: str) -> list[str]:
    """Where a report key is looked up, in order: a run attribute or a prefixed name as given; else the tag
    (what the run actually used: the resolved device, not "auto"), then the param, then the metric."""
    if key in RUN_ATTRIBUTES or key.startswith(("params.", "tags.", "metrics.")):
        return [key]
    return [f"tags.{key}", f"params.{key}", f"metrics.{key}"]


def has_key(runs: pd.DataFrame, key: str) -> bool:
    return any(column in runs.columns for column in key_columns(key))


# What a run written before its tag or param existed had: every run before fused training was trained alone,
# every run before the ``step`` setting had the eager step.
UNTAGGED = {FUSED_TAG: "false", "step": "eager"}


def run_values(runs: pd.DataFrame, key: str) -> pd.Series:
    """Each run's value of ``key`` as text: per run, the first of its tag, param and metric that it has (so a
    run that logged ``model`` as a param and one that tagged it both get their model); ``-`` for none, or what
    ``UNTAGGED`` says runs from before a tag existed had."""
    columns = [column for column in key_columns(key) if column in runs.columns]
    if not columns:
        available = sorted({column.split(".", 1)[-1] for column in runs.columns})
        raise ConfigError(f"no param, tag or metric named {key!r} in the selected runs; available: "
                          f"{', '.join(available)}")
    values = pd.Series(pd.NA, index=runs.index, dtype=object)
    for column in columns:
        values = values.fillna(runs[column].map(_as_text))
    return values.fillna(UNTAGGED.get(key, MISSING)).astype(str)


def _as_text(value: Any) -> Any:
    """Metric floats that hold whole numbers read like the params they mirror ("64", not "64.0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if pd.isna(value) else str(value)
