"""How a run ends, in one vocabulary (``RunStatus``), and what each end is in MLflow and in Optuna, in one table
(``STATUS_TABLE``). The engine sets a ``RunStatus``; the tracking layer, the study and the benchmarks map it
through this table, never through strings of their own.

Optuna's trial states are named, not imported: the engine does not depend on Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class _Text(str, Enum):
    """A str-valued enum that prints and formats as its value (``StrEnum`` needs Python 3.11)."""

    __str__ = str.__str__
    __format__ = str.__format__


class RunStatus(_Text):
    """A run's end; a ``str``, so that it compares equal to, logs and prints as its value."""

    COMPLETED = "completed"  # every epoch trained, tested
    PRUNED = "pruned"  # stopped by the study's pruner
    FAILED = "failed"  # an exception
    DIVERGED = "diverged"  # a NaN or infinite loss
    STOPPED = "stopped"  # stopped by a callback for another reason (a trial gone stale)
    KILLED = "killed"  # Ctrl-C or SIGTERM


class MlflowStatus(_Text):
    """MLflow's run statuses that sweepbench sets or reads."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    RUNNING = "RUNNING"


@dataclass(frozen=True)
class StatusMapping:
    mlflow: MlflowStatus  # the run's status in MLflow
    trial_state: str | None  # the Optuna TrialState a trial that ended so is told (None: never told)


# The one table. A pruned trial finished as its study designed it: FINISHED, its ``status`` tag (``pruned``)
# and run name saying so; KILLED is for runs a person or a signal stopped, which MLflow's UI draws as failures.
# A diverged trial fails (its objective is undefined), a stale one is left to the trial that replaces it, an
# interrupted one is failed and queued again by the study.
STATUS_TABLE: dict[RunStatus, StatusMapping] = {
    RunStatus.COMPLETED: StatusMapping(MlflowStatus.FINISHED, "COMPLETE"),
    RunStatus.PRUNED: StatusMapping(MlflowStatus.FINISHED, "PRUNED"),
    RunStatus.FAILED: StatusMapping(MlflowStatus.FAILED, "FAIL"),
    RunStatus.DIVERGED: StatusMapping(MlflowStatus.FAILED, "FAIL"),
    RunStatus.STOPPED: StatusMapping(MlflowStatus.KILLED, None),
    RunStatus.KILLED: StatusMapping(MlflowStatus.KILLED, "FAIL"),
}


# Reports' statuses: MLflow's, but a pruned run (FINISHED since pruning is by design; KILLED in stores written
# before) is PRUNED, never pooled with the runs that trained to their end.
PRUNED_REPORT_STATUS = "PRUNED"


def report_status(mlflow: str, status_tag: str | None) -> str:
    """A run's status as reports read it, from its MLflow status and its ``status`` tag."""
    return PRUNED_REPORT_STATUS if status_tag == RunStatus.PRUNED else mlflow


def mlflow_status(status: str) -> MlflowStatus:
    """The MLflow status of a run that ended with ``status``; an unknown one is FAILED."""
    try:
        return STATUS_TABLE[RunStatus(status)].mlflow
    except ValueError:
        return MlflowStatus.FAILED


def status_of_trial(state_name: str) -> RunStatus | None:
    """The run status a finished trial in Optuna state ``state_name`` stands for (the first in the table)."""
    return next((status for status, mapping in STATUS_TABLE.items() if mapping.trial_state == state_name), None)
