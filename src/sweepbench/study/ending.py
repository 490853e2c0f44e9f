"""How a trial ends: every way out of a trial (complete, pruned, failed, interrupted, infrastructure, stale) goes
through ``finish_trial``, the one place that tells the study, as Optuna's ``_run_trial`` has one tell site. It
records the trial's result, tells the study, queues the trial again when it did not end on its own (Ctrl-C or
SIGTERM at most ``MAX_RETRIES`` times; a storage or tracking store that stayed unreachable always, without
counting towards ``max_failed_trials``), gives a trial that failed before its training a FAILED MLflow run, and
applies the spec's checkpoint policy. A trial that another worker already failed as stale (its heartbeats stopped
while this worker was paused or cut off) is left as that worker left it: queued again there."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from .. import engine
from ..retry import ServiceUnavailable
from ..status import RunStatus
from ..tracking import Store, config_params
from ..tracking.store import MAX_MESSAGE_LENGTH
from .checkpoints import keep_checkpoints
from .job import StudyJob
from .registry import keep_final_weights
from .storage import ERROR_ATTR, FAILURE_ATTR, INFRASTRUCTURE, MAX_RETRIES, RUN_ID_ATTR, retry_trial

if TYPE_CHECKING:
    from .trial import TrialCallback

log = logging.getLogger(__name__)

STALE_MESSAGE = ("another worker failed this trial as stale (no heartbeat for longer than the grace period: was "
                 "this worker paused, or cut off from the storage?) and queued its parameters again; this worker "
                 "stops it and moves on")


class Ending(enum.Enum):
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"  # the trial's own failure: counts towards max_failed_trials
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: queued again, at most MAX_RETRIES times
    INFRASTRUCTURE = "infrastructure"  # a service stayed unreachable: queued again, always
    STALE = "stale"  # another worker failed it as stale and queued it again


RETRIES = {Ending.INTERRUPTED: MAX_RETRIES, Ending.INFRASTRUCTURE: None}  # None: no limit
ON_ITS_OWN = (Ending.COMPLETE, Ending.PRUNED, Ending.FAILED)  # the checkpoint policy applies


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, with the message of a failure and the training's result when it trained."""

    ending: Ending
    message: str = ""
    result: engine.RunResult | None = None

    @classmethod
    def of(cls, result: engine.RunResult) -> Outcome:
        """A training's outcome: complete, pruned, or failed (diverged, say) with its message."""
        if result.status == RunStatus.COMPLETED:
            return cls(Ending.COMPLETE, result=result)
        if result.status == RunStatus.PRUNED:
            return cls(Ending.PRUNED, result=result)
        return cls(Ending.FAILED, result.message or str(result.status), result)


def objective_value(result: engine.RunResult, metric: str) -> float:
    if metric == "val_accuracy":
        return result.best_val_accuracy
    if metric == "val_loss":
        return min(record.val_loss for record in result.history)
    return result.train_seconds


def finish_trial(study: optuna.Study, trial: optuna.Trial, job: StudyJob, outcome: Outcome,
                 callback: TrialCallback | None = None, parent_run_id: str | None = None) -> None:
    """Ends ``trial`` as ``outcome`` says (see the module docstring). ``callback`` is the trial's callback once it
    has one: a trial that failed with a callback but no MLflow run yet (a bad config) gets a FAILED run under
    ``parent_run_id``; one without a callback (reserved, never started) gets none."""
    if outcome.ending == Ending.STALE:
        log.warning(f"trial {trial.number}: {STALE_MESSAGE}")
        return
    try:
        if outcome.result is not None and callback is not None:
            _record_result(trial, outcome.result, callback)
        _tell(study, trial, job, outcome, callback, parent_run_id)
    except optuna.exceptions.UpdateFinishedTrialError:
        dropped = "; its result is dropped (the retry runs it again)" if outcome.result is not None else ""
        log.warning(f"trial {trial.number}: {STALE_MESSAGE}{dropped}")
    except ServiceUnavailable:
        if outcome.ending != Ending.INFRASTRUCTURE:
            raise
        return  # left RUNNING: it goes stale and is queued again once the storage answers
    else:
        if outcome.ending == Ending.COMPLETE:
            keep_final_weights(study, job, trial.number, outcome.result)
    if outcome.ending in ON_ITS_OWN:
        keep_checkpoints(study, job, trial.number)


def _tell(study: optuna.Study, trial: optuna.Trial, job: StudyJob, outcome: Outcome,
          callback: TrialCallback | None, parent_run_id: str | None) -> None:
    result = outcome.result
    if outcome.ending == Ending.COMPLETE:
        values = [objective_value(result, metric) for metric in job.spec.metric_names]
        study.tell(trial, values)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in zip(job.spec.metric_names, values))
        log.info(f"trial {trial.number} COMPLETE {shown} in {result.wall_seconds:.1f} s {trial.params}")
        return
    if outcome.ending == Ending.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"trial {trial.number} PRUNED after {len(result.history)} epoch(s) {trial.params}")
        return
    if outcome.ending == Ending.INFRASTRUCTURE:
        trial.set_user_attr(FAILURE_ATTR, INFRASTRUCTURE)
    trial.set_user_attr(ERROR_ATTR, outcome.message[:MAX_MESSAGE_LENGTH])
    if callback is not None and callback.logger.run_id is None:
        _record_failed_run(job, trial, parent_run_id, outcome.message)
    log.warning(f"trial {trial.number} FAIL {trial.params}: {outcome.message}")
    failed = study.tell(trial, state=TrialState.FAIL)
    if outcome.ending in RETRIES:
        retry_trial(study, failed, RETRIES[outcome.ending])


def _record_result(trial: optuna.Trial, result: engine.RunResult, callback: TrialCallback) -> None:
    """``engine_seconds`` is the engine's own time (data, model, training, evaluation), without the callbacks'
    bookkeeping: against the trial's duration in Optuna (ask to tell), it gives the bookkeeping share, of which
    ``tracking_seconds`` is MLflow's (the run's logger). A fused pack's members each record the pack's
    ``train_seconds`` and its ``pack_size`` (their share: the one over the other)."""
    attrs = {"epochs_run": len(result.history), "best_epoch": result.best_epoch,
             "test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
             "engine_seconds": result.wall_seconds - callback.seconds,
             "tracking_seconds": callback.logger.logging_seconds, "checkpoint": result.checkpoints.get("best"),
             "pack_size": callback.pack_size}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _record_failed_run(job: StudyJob, trial: optuna.Trial, parent_run_id: str | None, message: str) -> None:
    """A FAILED child run for a trial that failed before training started (a bad config, say): the study's
    settings with the trial's parameters over them, as params."""
    from .trial import trial_run_name, trial_tags  # trial.py ends its trials here

    store = Store(job.tracking_uri)
    params = {**config_params(job.spec.base_config), **{name: str(value) for name, value in trial.params.items()}}
    run_id = store.start_run(store.experiment(job.experiment), trial_run_name(trial), "trial",
                             {**trial_tags(job.spec, trial, job.spec_version), "status": str(RunStatus.FAILED)},
                             params, parent_run_id)
    store.fail_run(run_id, message)
    trial.set_user_attr(RUN_ID_ATTR, run_id)
