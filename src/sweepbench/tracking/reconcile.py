"""Runs left RUNNING by a process that is gone (SIGKILL, a crash, a machine that went down) end KILLED here.

Every training run, and a benchmark's parent and cell runs, record where they run (``process_tags``: host, pid and
the process's start time, from psutil, so that a reused pid is not taken for the run's writer).
``reconcile_dead_runs`` ends the RUNNING runs of this host whose process is gone; runs of other hosts are left alone
(their processes cannot be seen from here), and so are study trials, whose runs a ``study run`` reconciles with
their Optuna states.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import psutil
from mlflow.entities import Run

from ..status import MlflowStatus
from .schema import KIND_TAG
from .store import SEARCH_LIMIT, Store, sqlite_path

HOST_TAG = "sweepbench.host"
PID_TAG = "sweepbench.pid"
PID_STARTED_TAG = "sweepbench.pid_started"  # psutil's create_time: seconds since the epoch, to 0.01 s
# psutil adds the boot time, which the kernel derives from the clock: a stepped clock moves it by a second or so
START_TIME_TOLERANCE_SECONDS = 2.0
STUDY_TRIAL_KIND = "trial"
RUNNING_FILTER = "attributes.status = 'RUNNING'"


def process_tags() -> dict[str, str]:
    """The tags that tell which process writes a run: host, pid and its start time."""
    return {HOST_TAG: platform.node(), PID_TAG: str(os.getpid()),
            PID_STARTED_TAG: _start_time(psutil.Process())}


def _start_time(process: psutil.Process) -> str:
    return f"{process.create_time():.2f}"


def _seconds(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def process_gone(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` of this host, started at ``started`` (None: not recorded), has ended. A start
    time in the clock ticks that versions before psutil recorded (no decimal point) reads as not recorded."""
    recorded = _seconds(started) if started and "." in started else None
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return True  # a zombie has exited; only its exit status is left for its parent to read
        return recorded is not None and abs(process.create_time() - recorded) > START_TIME_TOLERANCE_SECONDS
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # another user's process: alive


@dataclass(frozen=True)
class RunningRun:
    """A RUNNING run with process tags, and what reconciling found: ``ended`` when its process was gone (it is
    KILLED now), else left alone, ``elsewhere`` when it runs on another host."""

    run_id: str
    run_name: str
    experiment_id: str
    host: str
    pid: int
    ended: bool
    elsewhere: bool

    def describe(self) -> str:
        return f"ended MLflow run {self.run_id} ({self.run_name}) KILLED: its process ({self.host}:{self.pid}) is gone"


def reconcile_dead_runs(store: Store, experiment_ids: list[str] | None = None) -> list[RunningRun]:
    """Ends KILLED, with a ``stop_reason``, every RUNNING run (of ``experiment_ids``, else of all experiments)
    whose process, on this host, is gone. Returns every RUNNING run with process tags that it looked at (study
    trials aside), each saying whether it was ended. One search; a store that does not exist yet is not made."""
    if not _store_exists(store):
        return []
    if experiment_ids is None:
        experiment_ids = list(store.experiment_names())
    if not experiment_ids:
        return []
    runs = store.client.search_runs(experiment_ids, RUNNING_FILTER, max_results=SEARCH_LIMIT)
    return [_reconcile(store, run) for run in runs if _is_reconcilable(run)]


def reconcile_experiment(store: Store, name: str) -> list[RunningRun]:
    """``reconcile_dead_runs`` for experiment ``name``; nothing when it, or its store, does not exist yet."""
    experiment = store.client.get_experiment_by_name(name) if _store_exists(store) else None
    return [] if experiment is None else reconcile_dead_runs(store, [experiment.experiment_id])


def _store_exists(store: Store) -> bool:
    database = sqlite_path(store.tracking_uri)
    return database is None or database.exists()


def _is_reconcilable(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(PID_TAG, "").isdigit() and HOST_TAG in tags and tags.get(KIND_TAG) != STUDY_TRIAL_KIND


def _reconcile(store: Store, run: Run) -> RunningRun:
    """Ends ``run`` if its process is gone and it is still RUNNING: read again once the process is known to be
    gone, since a process that ended its run and exited after the search is gone too."""
    tags = run.data.tags
    host, pid = tags[HOST_TAG], int(tags[PID_TAG])
    elsewhere = host != platform.node()
    ended = not elsewhere and process_gone(pid, tags.get(PID_STARTED_TAG)) and \
        store.client.get_run(run.info.run_id).info.status == MlflowStatus.RUNNING
    if ended:
        store.end_run(run.info.run_id, MlflowStatus.KILLED,
                      {"stop_reason": f"its process ({host}:{pid}) is gone; reconciled by sweepbench"})
    return RunningRun(run.info.run_id, run.info.run_name, run.info.experiment_id, host, pid, ended, elsewhere)
