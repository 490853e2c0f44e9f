"""How workers share a study: each reserves its trials, so that the study ends with exactly N finished.

Storage is Optuna's RDB storage (SQLite in ``mlruns/studies/<name>.db`` by default, or any PostgreSQL URL shared
by workers on many machines) with heartbeats, so a killed worker's trial goes stale, is marked FAIL and is queued
again with the same parameters.

**Exactly N finished trials.** ``n_trials`` is the study's total target of *finished* trials, COMPLETE or PRUNED,
whoever runs them and however often the command is restarted. Optuna's ``MaxTrialsCallback`` checks the count
after a trial ends, so workers that start together overshoot. Here each worker reserves its next trial
atomically: under a lock (a PostgreSQL advisory lock for PostgreSQL storage, a file lock beside a SQLite file;
other databases get a file lock under ``mlruns/`` that only serialises the workers of one machine) it counts
COMPLETE + PRUNED + RUNNING trials and only calls ``ask`` while that count is below N. A worker that finds
every remaining slot held by RUNNING trials waits for them instead of leaving: if their worker died, the trial
goes stale, is retried, and the waiting worker runs the retry. So the study ends with exactly N finished trials
and none RUNNING.

**FAIL trials** (the trial raised, or its training diverged) do not count towards N: the study goes on. To stop a
study whose every trial fails, it ends once ``max_failed_trials`` trials have failed on their own. Trials that
failed because their worker died or was interrupted are retried (at most ``MAX_RETRIES`` times) and count as
failures only when they run out of retries; trials that failed because the storage stayed unreachable are
always retried and never count.

**Workers die with their parent**: a local worker whose ``study run`` process is gone (SIGKILL) stops its trial
as Ctrl-C would (FAIL, queued again) within a second, instead of running trials on its own.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from .. import engine
from ..config import ConfigError
from ..retry import PermanentError, ServiceUnavailable
from . import identity
from .job import StudyJob, redact
from .samplers import create_sampler
from .spec import StudySpec
from .storage import (FAILURE_ATTR, INFRASTRUCTURE, PARENT_RUN_ATTR, RETRY_HISTORY, SEED_CLAIM_ATTR,
                      RetryingStorage, _quiet, open_storage, storage_lock)
from .trial import release, run_trials

POLL_SECONDS = 1.0
PARENT_CHECK_SECONDS = 1.0
INTERRUPT_GRACE_SECONDS = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def create_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**spec.pruner_options)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=spec.base_config.epochs, **spec.pruner_options)
    return optuna.pruners.NopPruner()


def worker_seed(spec: StudySpec, study: optuna.Study, storage_url: str, worker_index: int,
                claimant: str | None = None) -> int | None:
    """The sampler seed of one worker: the spec's seed mixed with the study's trial count and the worker's index,
    so parallel workers and resumed runs do not replay one random start, and the spec's seed itself for the first
    worker of a new study (reproducible). The first process (``claimant``: host and pid) to take a (trial count,
    worker index) pair claims it in the study, under the storage lock; a worker on another machine that starts
    at the same pair also mixes in its own name instead of replaying the claimant's trials."""
    if spec.sampler_seed is None:
        return None
    trials_so_far = len(study.get_trials(deepcopy=False))
    claimant = claimant or f"{platform.node()}:{os.getpid()}"
    key = f"{SEED_CLAIM_ATTR}.{trials_so_far}.{worker_index}"
    with storage_lock(storage_url):
        owner = study.user_attrs.get(key)
        if owner is None:
            study.set_user_attr(key, claimant)
            owner = claimant
    if owner != claimant:
        return _mixed_seed(spec.sampler_seed, trials_so_far, worker_index, zlib.crc32(claimant.encode()))
    if trials_so_far == 0 and worker_index == 0:
        return spec.sampler_seed
    return _mixed_seed(spec.sampler_seed, trials_so_far, worker_index)


def _mixed_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def load_study(job: StudyJob, storage: RetryingStorage, worker_index: int | None = None) -> optuna.Study:
    """Creates the study, or loads it to resume; its directions and its spec's identity (``identity``) must be
    the spec's, else nothing is written. A worker (``worker_index`` given) gets the spec's sampler with its own
    seed; without one the study is only read and written to."""
    spec = job.spec
    with _quiet():
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                    load_if_exists=True, pruner=create_pruner(spec))
        stored = [direction.name.lower() for direction in study.directions]
        if stored != spec.directions:
            changed = None if job.new_spec_version else identity.refusal(study, spec, redact(job.storage_url))
            raise changed or ConfigError(
                f"objective: study {spec.name!r} in {redact(job.storage_url)} optimises {stored}, the spec "
                f"{spec.directions}; Optuna cannot change a study's directions (not even as a new spec version): "
                "rename the study or use another storage")
        with storage_lock(job.storage_url):
            identity.settle(study, spec, redact(job.storage_url), job.new_spec_version)
        if study.metric_names != spec.metric_names:
            study.set_metric_names(spec.metric_names)
    if worker_index is not None:
        study.sampler = create_sampler(spec, worker_seed(spec, study, job.storage_url, worker_index))
    return study


@dataclass(frozen=True)
class Tally:
    finished: int
    running: int
    failed: int

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> Tally:
        retried = {number for trial in trials for number in trial.system_attrs.get(RETRY_HISTORY, [])}
        return cls(
            finished=sum(trial.state in FINISHED for trial in trials),
            running=sum(trial.state == TrialState.RUNNING for trial in trials),
            failed=sum(trial.state == TrialState.FAIL and trial.number not in retried
                       and trial.user_attrs.get(FAILURE_ATTR) != INFRASTRUCTURE for trial in trials),
        )

    def settled(self, spec: StudySpec) -> bool:
        return self.finished >= spec.target_trials() or self.failed >= spec.max_failed_trials

    def slots(self, spec: StudySpec) -> int:
        """Trials still to reserve: the target less those finished and those running."""
        return max(0, spec.target_trials() - self.finished - self.running)


def _fail_stale_trials(study: optuna.Study) -> None:
    with _quiet():
        optuna.storages.fail_stale_trials(study)


def run_worker(job: StudyJob, worker_index: int = 0) -> None:
    """Reserves and runs trials (up to the spec's ``pack`` at once) until the study is settled (see the module
    docstring) or the timeout passes."""
    storage = open_storage(job)
    study = load_study(job, storage, worker_index)
    parent_run_id = study.user_attrs[PARENT_RUN_ATTR]
    deadline = None if job.spec.timeout is None else time.monotonic() + job.spec.timeout
    while deadline is None or time.monotonic() < deadline:
        _fail_stale_trials(study)
        trials: list[optuna.Trial] = []
        try:
            with storage_lock(job.storage_url):
                tally = Tally.of(study.get_trials(deepcopy=False))
                if tally.settled(job.spec):
                    return
                for _ in range(min(job.spec.pack, tally.slots(job.spec))):
                    trials.append(_ask(study, storage))
        except KeyboardInterrupt as interrupt:
            release(study, trials, engine.interrupt_message(interrupt))
            raise
        if trials:
            run_trials(study, trials, job, storage, parent_run_id)
        else:
            time.sleep(POLL_SECONDS)


def _ask(study: optuna.Study, storage: RetryingStorage) -> optuna.Trial:
    """A new (or queued) trial, with its first heartbeat at once: a trial without one never goes stale."""
    with _quiet():
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    return trial


def configure_logging() -> None:
    """One line per trial (and per service outage) from sweepbench; Optuna's chatter only when it is a warning.
    Not passed on to the root logger, which ``mlflow.pytorch`` gives a handler of its own (``basicConfig``) that
    would print every line twice."""
    log = logging.getLogger("sweepbench")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _worker_process(job: StudyJob, worker_index: int, parent_pid: int) -> None:
    """Entry point of a spawned local worker: a fair share of the CPU threads, a watch on its parent, then the
    worker loop. A storage that stays unreachable ends the worker with one line and exit status 1."""
    configure_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    try:
        with engine.sigterm_interrupts():
            _watch_parent(parent_pid)
            run_worker(job, worker_index)
    except engine.Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except (ServiceUnavailable, PermanentError) as exc:
        logging.getLogger(__name__).error(f"worker {worker_index} stops: {exc}")
        sys.exit(1)


def _watch_parent(parent_pid: int) -> None:
    """Sends this worker SIGTERM (handled like Ctrl-C) once its parent is gone: an orphan is re-parented, so
    its parent pid changes."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        logging.getLogger(__name__).warning(f"worker {os.getpid()}: its study run process {parent_pid} is gone; "
                                            "stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class WorkersFailed(RuntimeError):
    """A local worker process ended with an error (its own line says which)."""


def _run_workers(job: StudyJob) -> None:
    if job.workers == 1:
        run_worker(job)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process, args=(job, index, os.getpid()),
                                 name=f"sweepbench-worker-{index}") for index in range(job.workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt as interrupt:
        _stop_workers(processes, signal.SIGTERM if isinstance(interrupt, engine.Terminated) else signal.SIGINT)
        raise
    crashed = {process.name: process.exitcode for process in processes if process.exitcode != 0}
    if crashed:
        raise WorkersFailed(f"worker process(es) exited abnormally (exit status): {crashed}; see their lines above")


def _stop_workers(processes: list[multiprocessing.process.BaseProcess], signum: int) -> None:
    """After Ctrl-C or SIGTERM: a terminal's Ctrl-C (or a scheduler's SIGTERM to the process group) reaches every
    worker, which marks its trial and stops; a signal sent to this process alone is passed on to the workers
    still running after a grace period, at once if a second one comes. Returns when every worker has ended."""
    deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
    try:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signum)
    while any(process.is_alive() for process in processes):
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            continue
