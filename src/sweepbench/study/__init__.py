"""Optuna studies over the one engine, tracked in MLflow as one parent run with a child run per trial.

``run_study`` runs (or resumes) a study with local worker processes and logs its outcome to the parent run. The
modules, bottom up: ``spec`` (the TOML spec), ``job`` (what every worker is given), ``storage`` (the shared
Optuna storage, its lock, heartbeats and retries), ``seeds`` and ``loading`` (a worker's sampler seed; the study
created or loaded), ``trial`` (the objective), ``ending`` (the one place a trial ends), ``coordination``
(exactly N finished trials across workers), ``processes`` (local worker processes), ``joining`` (a worker from
another machine: ``study worker``), ``summary`` (reading a study back) and ``parent`` (the MLflow parent run).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import optuna

from ..data import forget_loaded_datasets, load_dataset
from ..devices import resolve_device
from ..models import check_config
from ..precisions import check_precision
from ..status import MlflowStatus
from ..steps import check_step_device
from ..tracking import Store
from ..tracking.system import start_system_metrics
from . import identity
from .coordination import Tally
from .loading import load_study
from .processes import _run_workers, configure_logging
from .seeds import worker_seed
from .job import StudyJob, make_job, normalize_storage_url, redact
from .parent import _open_parent_run, log_study_outcome, reconcile
from .spec import StudySpec
from .storage import (RETRY_HISTORY, RUN_ID_ATTR, WORKER_ATTR, adopt_heartbeat_interval, open_existing_study,
                      open_storage)
from .summary import describe_importances, describe_study, export_trials

log = logging.getLogger(__name__)

__all__ = [
    "RETRY_HISTORY", "RUN_ID_ATTR", "WORKER_ATTR", "StudyJob", "StudyOutcome", "configure_logging",
    "describe_importances", "describe_study", "export_trials", "load_study", "make_job", "normalize_storage_url",
    "open_existing_study", "open_storage", "redact", "run_study", "worker_seed",
]


@dataclass
class StudyOutcome:
    study: optuna.Study
    job: StudyJob
    parent_run_id: str
    status: str
    tally: Tally
    finished_before: int
    wall_seconds: float

    @property
    def trials_per_minute(self) -> float:
        return 60 * (self.tally.finished - self.finished_before) / self.wall_seconds

    def describe(self) -> str:
        """What ``sweepbench study run`` ends with: the comparison table, the figures, where to browse."""
        from ..tracking import Store, browse_hint
        from .registry import describe_registered_model

        store = Store(self.job.tracking_uri)
        ui = browse_hint(self.job.tracking_uri, store.experiment(self.job.experiment))
        return "\n".join([
            describe_study(self.study), "",
            f"{self.reason()} in {self.wall_seconds:.0f} s ({self.trials_per_minute:.1f} finished trials/min); "
            f"MLflow parent run {self.parent_run_id} ({self.status})",
            describe_registered_model(store, self.job.spec.name),
            f"browse the runs: {ui}",
        ])

    def reason(self) -> str:
        spec, tally = self.job.spec, self.tally
        if tally.finished >= spec.target_trials():
            return f"reached its target of {spec.target_trials()} finished trials"
        if tally.failed >= spec.max_failed_trials:
            return f"stopped after {tally.failed} failed trials (max_failed_trials = {spec.max_failed_trials})"
        return f"timed out with {tally.finished} of {spec.target_trials()} trials finished"


def check_inputs(job: StudyJob) -> None:
    """What ``train`` checks before any run exists, checked before the study's storage or runs are made: the
    fixed settings make a model that fits the dataset, and the dataset's file loads (a broken file is refused
    in one line, not found by every trial). With several workers, each loads its own copy; this one is let go."""
    config = job.spec.base_config
    check_config(config)
    check_devices(job.spec)
    load_dataset(config.dataset, config.data_dir, config.download, config.val_size, **config.dataset_kwargs)
    if job.workers > 1:
        forget_loaded_datasets()


def check_devices(spec: StudySpec) -> None:
    """The study's fixed device is here and its fixed precision and step run on it: else every trial would fail
    on it (the refusals are the engine's: ``devices.resolve_device``, ``precisions.check_precision``,
    ``steps.check_step_device``). A searched one is left to the trials: one that draws a value that cannot run
    here fails alone."""
    searched = {param.name for param in spec.search}
    if "device" in searched:
        return
    device_type = resolve_device(spec.base_config.device).type
    if "precision" not in searched:
        check_precision(spec.base_config.precision, device_type)
    if "step" not in searched:
        check_step_device(spec.base_config.step, device_type)


def useful_workers(job: StudyJob, tally: Tally) -> int:
    """``job.workers``, capped at the workers the trials left can keep busy (each reserves up to ``pack``), with
    one line when it is: more would start processes that find nothing to run."""
    left = tally.slots(job.spec)
    useful = max(1, math.ceil(left / job.spec.pack))
    if job.workers <= useful:
        return job.workers
    log.warning(f"--workers: {job.workers} capped at {useful}: the study has {left} trial(s) left to run")
    return useful


def resume_line(trials: list[optuna.trial.FrozenTrial], tally: Tally, job: StudyJob) -> str | None:
    """What a rerun finds in its study (``trials``, ``tally`` of them) and queues again, in one line; None for a
    new study."""
    if not trials:
        return None
    states = [trial.state for trial in trials]
    queued = [trial for trial in trials if trial.state == optuna.trial.TrialState.WAITING]
    again = [f"trial {trial.system_attrs[RETRY_HISTORY][-1]} as {trial.number}" for trial in queued
             if trial.system_attrs.get(RETRY_HISTORY)]
    parts = [f"resuming study {job.spec.name!r}: {tally.finished} of {job.spec.target_trials()} trials finished "
             f"({states.count(optuna.trial.TrialState.COMPLETE)} complete, "
             f"{states.count(optuna.trial.TrialState.PRUNED)} pruned), {tally.failed} failed"]
    if again:
        parts.append(f"queued again: {', '.join(again)}")
    if tally.running:
        parts.append(f"{tally.running} running (another worker's, or left by a process that is gone: failed and "
                     f"queued again once its heartbeats stop)")
    parts.append(f"{tally.slots(job.spec)} to run")
    return "; ".join(parts)


def run_study(job: StudyJob) -> StudyOutcome:
    """Runs (or resumes) a study with ``job.workers`` local workers, then logs its outcome to the parent run.
    A study that stops on ``max_failed_trials`` ends FAILED; Ctrl-C ends it KILLED and re-raises. The heartbeat
    interval is the study's (the first worker's); child runs are reconciled with the trials before and after."""
    started = time.perf_counter()
    check_inputs(job)
    storage = open_storage(job)
    study = load_study(job, storage)
    adopted = adopt_heartbeat_interval(job, study)
    if adopted != job:
        job, storage = adopted, open_storage(adopted)
        study = load_study(job, storage)
    trials = study.get_trials(deepcopy=False)
    tally = Tally.of(trials)
    resuming = resume_line(trials, tally, job)
    if resuming:
        log.info(resuming)
    job = dataclasses.replace(job, spec_version=identity.version_of(study, job.spec),
                              workers=useful_workers(job, tally))
    finished_before = tally.finished
    store = Store(job.tracking_uri)
    parent_run_id = _open_parent_run(study, job, store)
    with store.lifecycle(parent_run_id) as outcome:
        reconcile(study, job, store, parent_run_id)
        system = start_system_metrics(job.tracking_uri, parent_run_id, job.system_metrics)
        try:
            _run_workers(job)
            tally = Tally.of(study.get_trials(deepcopy=False))
            if tally.failed >= job.spec.max_failed_trials and tally.finished < job.spec.target_trials():
                outcome.status = MlflowStatus.FAILED
        finally:
            if system is not None:
                system.stop()
            reconcile(study, job, store, parent_run_id)
            log_study_outcome(study, job, store, parent_run_id)
    return StudyOutcome(study, job, parent_run_id, outcome.status, tally, finished_before,
                        time.perf_counter() - started)
