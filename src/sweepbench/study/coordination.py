"""How workers share a study: each reserves its trials, so that the study ends with exactly N finished.

Storage is Optuna's RDB storage (SQLite in ``mlruns/studies/<name>.db`` by default, or any PostgreSQL URL shared
by workers on many machines, directly or through Optuna's gRPC proxy) with heartbeats, so a killed worker's trial
goes stale, is marked FAIL and is queued again with the same parameters.

**Exactly N finished trials.** ``n_trials`` is the study's total target of *finished* trials, COMPLETE or PRUNED,
whoever runs them and however often the command is restarted. Optuna's ``MaxTrialsCallback`` checks the count
after a trial ends, so workers that start together overshoot. Here each worker reserves its next trial
atomically: under a lock (a PostgreSQL advisory lock for PostgreSQL storage, a file lock beside a SQLite file, a
study only one process can create through the gRPC proxy: ``storage.locks``; other databases get a file lock under
``mlruns/`` that only serialises the workers of one machine) it counts
COMPLETE + PRUNED + RUNNING trials and only calls ``ask`` while that count is below N. A worker that finds
every remaining slot held by RUNNING trials waits for them instead of leaving: if their worker died, the trial
goes stale, is retried, and the waiting worker runs the retry. So the study ends with exactly N finished trials
and none RUNNING.

**FAIL trials** (the trial raised, or its training diverged) do not count towards N: the study goes on. To stop a
study whose every trial fails, it ends once ``max_failed_trials`` trials have failed on their own. Trials that
failed because their worker died or was interrupted are retried (at most ``MAX_RETRIES`` times) and count as
failures only when they run out of retries; trials that failed because the storage stayed unreachable are
always retried and never count. Every way a trial ends goes through ``ending.finish_trial``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import engine
from .ending import Ending, Outcome, finish_trial
from .job import StudyJob
from .loading import load_study
from .spec import StudySpec
from .storage import (FAILURE_ATTR, INFRASTRUCTURE, PARENT_RUN_ATTR, RETRY_HISTORY, RetryingStorage, _heartbeat,
                      _quiet, open_storage, storage_lock)
from .trial import release, run_trials

POLL_SECONDS = 1.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
        reserved: list[int] = []  # the trials' ids, which the heartbeat thread beats for as they come
        with _heartbeat(storage, reserved, job.heartbeat_interval):
            try:
                if not _reserve(study, storage, job, trials, reserved):
                    return
            except KeyboardInterrupt as interrupt:
                release(study, trials, job, engine.interrupt_message(interrupt))
                raise
            if trials:
                run_trials(study, trials, job, parent_run_id)
        if not trials:
            time.sleep(POLL_SECONDS)


def _reserve(study: optuna.Study, storage: RetryingStorage, job: StudyJob, trials: list[optuna.Trial],
             reserved: list[int]) -> bool:
    """Reserves the worker's next trials into ``trials`` (and their ids into ``reserved``) under the storage
    lock; False once the study is settled. The lock's lease is renewed after each trial (a slow sampler's pack may
    take a while: ``locks.study_mutex``). Trials reserved by a holder that lost the lock meanwhile (a PostgreSQL
    advisory lock goes with its connection; the gRPC proxy's with its lease) are not run: they end as failures of
    the infrastructure, queued again, so that no reservation can exceed the target."""
    with storage_lock(job.storage_url) as lease:
        tally = Tally.of(study.get_trials(deepcopy=False))
        if tally.settled(job.spec):
            return False
        for _ in range(min(job.spec.pack, tally.slots(job.spec))):
            trials.append(_ask(study, storage))
            reserved.append(trials[-1]._trial_id)
            lease.renew()
        if trials and not lease.held():
            for trial in trials:
                finish_trial(study, trial, job, Outcome(Ending.INFRASTRUCTURE, LOST_LOCK_MESSAGE))
            trials.clear()
    return True


LOST_LOCK_MESSAGE = ("reserved while this worker's storage lock was lost (its connection dropped, or it stalled "
                     "past the lock's lease); not run, queued again")


def _ask(study: optuna.Study, storage: RetryingStorage) -> optuna.Trial:
    """A new (or queued) trial, with its first heartbeat at once: a trial without one never goes stale."""
    with _quiet():
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    return trial
