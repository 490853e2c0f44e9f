"""The objective: a trial suggests its parameters, trains the one engine with them, reports every epoch to the
pruner and tells the study how it ended, as in Optuna's ``pytorch_simple.py`` example. Around that, what a
shared study needs: an MLflow child run per trial, a heartbeat while it trains, a retry when Ctrl-C or SIGTERM
stops it or its storage stays unreachable (an infrastructure failure, which does not count towards
``max_failed_trials``), and a quiet stop when another worker failed it as stale while this one was paused. A
worker may reserve several trials at once (the spec's ``pack``) and train those that can share one stacked model
fused (``engine.fused``): each is still its own trial, MLflow run and checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import engine
from ..config import RunConfig
from ..engine.fused.pack import PACK_SIZE_TAG
from ..models import check_config
from ..retry import ServiceUnavailable
from ..status import RunStatus
from ..tracking import MlflowLogger, Store, config_params
from ..tracking.store import MAX_MESSAGE_LENGTH
from .checkpoints import keep_checkpoints, trial_checkpoint_dir
from .registry import keep_final_weights
from .identity import VERSION_ATTR, VERSION_TAG
from .job import StudyJob
from .spec import EPOCH_METRICS, ParamSpec, StudySpec
from .storage import (ERROR_ATTR, FAILURE_ATTR, INFRASTRUCTURE, MAX_RETRIES, RUN_ID_ATTR, WORKER_ATTR,
                      RetryingStorage, _heartbeat, retry_trial)

log = logging.getLogger(__name__)


def suggest(trial: optuna.Trial, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.type == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=int(param.step or 1),
                                 log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``{"lr": 0.01, "model_kwargs.hidden_size": 256}`` applied to a config; validated like any config."""
    changes: dict[str, Any] = {}
    for name, value in params.items():
        head, dot, arg = name.partition(".")
        if dot:
            changes[head] = {**changes.get(head, getattr(base, head)), arg: value}
        else:
            changes[name] = value
    return base.replace(**changes)


def objective_value(result: engine.RunResult, metric: str) -> float:
    if metric == "val_accuracy":
        return result.best_val_accuracy
    if metric == "val_loss":
        return min(record.val_loss for record in result.history)
    return result.train_seconds


class TrialCallback(engine.Callback):
    """A trial's side of a training run: its MLflow child run (through ``MlflowLogger``), the trial's link to it,
    per-epoch reports to the pruner, and the time all this bookkeeping takes (``seconds``)."""

    def __init__(self, trial: optuna.Trial, mlflow_logger: MlflowLogger, prune_metric: str | None) -> None:
        self.trial, self.logger, self.prune_metric = trial, mlflow_logger, prune_metric
        self.seconds = 0.0
        self.pack_size = 1  # the trials trained with this one as one fused pack, itself included
        self.stale = False  # failed as stale by another worker while this one was paused

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def on_train_start(self, context: engine.TrainContext) -> None:
        with self._timed():
            self.logger.on_train_start(context)
            self._link_run()
        if context.pack:
            self.pack_size = int(context.pack[PACK_SIZE_TAG])

    def _link_run(self) -> None:
        """The trial's link to its MLflow run, once the run exists (late, when the tracking store was down)."""
        if self.logger.run_id and self.trial.user_attrs.get(RUN_ID_ATTR) != self.logger.run_id:
            try:
                self.trial.set_user_attr(RUN_ID_ATTR, self.logger.run_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                self.stale = True

    def on_epoch_end(self, context: engine.TrainContext, record: engine.EpochRecord) -> None:
        with self._timed():
            self.logger.on_epoch_end(context, record)
            try:
                prune = self.prune_metric is not None and self._should_prune(record)
            except optuna.exceptions.UpdateFinishedTrialError:
                self.stale = True
        if self.stale:
            raise engine.StopTraining(STALE_MESSAGE, status=RunStatus.STOPPED)
        if prune:
            raise engine.StopTraining(f"pruned by the {type(self.trial.study.pruner).__name__} after epoch "
                                      f"{record.epoch}", status=RunStatus.PRUNED)

    def _should_prune(self, record: engine.EpochRecord) -> bool:
        self.trial.report(getattr(record, self.prune_metric), record.epoch)
        return self.trial.should_prune()

    def on_train_end(self, context: engine.TrainContext, result: engine.RunResult) -> None:
        with self._timed():
            self.logger.on_train_end(context, result)
            if not self.stale:
                self._link_run()


STALE_MESSAGE = ("another worker failed this trial as stale (no heartbeat for longer than the grace period: was "
                 "this worker paused?) and queued its parameters again; this worker stops it and moves on")


def trial_run_name(trial: optuna.Trial | FrozenTrial) -> str:
    """``trial-0003 hidden_size=64 lr=0.0123 optimizer=adam``: the trial's number and its sampled parameters,
    so that MLflow's runs table shows what each trial tried without configuring a column."""
    shown = " ".join(f"{name.rsplit('.', 1)[-1]}={value:.3g}" if isinstance(value, float) else
                     f"{name.rsplit('.', 1)[-1]}={value}" for name, value in trial.params.items())
    return f"trial-{trial.number:04d} {shown}".rstrip()


def trial_tags(spec: StudySpec, trial: optuna.Trial | FrozenTrial, spec_version: int | None) -> dict[str, str]:
    tags = {"optuna.study_name": spec.name, "optuna.trial_number": str(trial.number)}
    if spec_version is not None:
        tags[VERSION_TAG] = str(spec_version)
    return tags


def _record_failed_run(job: StudyJob, trial: optuna.Trial, parent_run_id: str, message: str) -> None:
    """A FAILED child run for a trial that failed before training started (a bad config, say): the study's
    settings with the trial's parameters over them, as params."""
    store = Store(job.tracking_uri)
    params = {**config_params(job.spec.base_config), **{name: str(value) for name, value in trial.params.items()}}
    run_id = store.start_run(store.experiment(job.experiment), trial_run_name(trial), "trial",
                             {**trial_tags(job.spec, trial, job.spec_version), "status": str(RunStatus.FAILED)},
                             params, parent_run_id)
    store.fail_run(run_id, message)
    trial.set_user_attr(RUN_ID_ATTR, run_id)


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


def _fail(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback, parent_run_id: str,
          message: str) -> FrozenTrial | None:
    """Tells the study the trial FAILed with ``message``; None when another worker already failed it as stale
    (and queued it again)."""
    try:
        trial.set_user_attr(ERROR_ATTR, message[:MAX_MESSAGE_LENGTH])
        if callback.logger.run_id is None:
            _record_failed_run(job, trial, parent_run_id, message)
        log.warning(f"trial {trial.number} FAIL {trial.params}: {message}")
        return study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(f"trial {trial.number}: {STALE_MESSAGE}")
        return None


def _fail_and_retry(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback,
                    parent_run_id: str, message: str, max_retries: int | None = MAX_RETRIES) -> None:
    failed = _fail(study, trial, job, callback, parent_run_id, message)
    if failed is not None:
        retry_trial(study, failed, max_retries)


@dataclass
class Member:
    """A reserved trial ready to train: its config (the spec's with the trial's parameters) and its callback."""

    trial: optuna.Trial
    config: RunConfig
    callback: TrialCallback


def run_trials(study: optuna.Study, trials: Sequence[optuna.Trial], job: StudyJob, storage: RetryingStorage,
               parent_run_id: str) -> None:
    """Trains reserved trials and tells the study how each ended: those that can share a pack (``engine.fused``)
    train fused when the spec's ``pack`` is above 1, the others one by one; every trial keeps its heartbeat until
    it is told. A trial whose parameters make no valid config FAILs at once."""
    try:
        members = [member for member in (_prepare(study, trial, job, parent_run_id) for trial in trials) if member]
        with _heartbeat(storage, [trial._trial_id for trial in trials], job.heartbeat_interval):
            for group in engine.pack_groups([member.config for member in members]):
                _train_group(study, [members[index] for index in group], job, parent_run_id)
    except KeyboardInterrupt as interrupt:
        release(study, trials, engine.interrupt_message(interrupt))
        raise


def release(study: optuna.Study, trials: Sequence[optuna.Trial], message: str) -> None:
    """Ctrl-C or SIGTERM before or between trainings: the reserved trials still RUNNING (not started yet, or
    waiting for their pack) FAIL with ``message`` and are queued again, as an interrupted training's are."""
    for trial in trials:
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            trial.set_user_attr(ERROR_ATTR, message)
            retry_trial(study, study.tell(trial, state=TrialState.FAIL))


def _prepare(study: optuna.Study, trial: optuna.Trial, job: StudyJob, parent_run_id: str) -> Member | None:
    spec = job.spec
    trial.set_user_attr(WORKER_ATTR, f"{platform.node()}:{os.getpid()}")
    trial.set_user_attr(VERSION_ATTR, job.spec_version)
    mlflow_logger = MlflowLogger(job.experiment, job.tracking_uri, run_name=trial_run_name(trial),
                                 parent_run_id=parent_run_id, tags=trial_tags(spec, trial, job.spec_version),
                                 log_model=False, log_artifacts=False, kind="trial")
    single_epoch_metric = len(spec.objectives) == 1 and spec.metric_names[0] in EPOCH_METRICS
    callback = TrialCallback(trial, mlflow_logger, spec.metric_names[0] if single_epoch_metric else None)
    try:
        params = {param.name: suggest(trial, param) for param in spec.search}
        mlflow_logger.run_name = trial_run_name(trial)
        config = apply_params(spec.base_config, params)
        check_config(config)  # here, not in a pack, where it would fail the other members too
    except Exception as exc:
        _fail(study, trial, job, callback, parent_run_id, f"{type(exc).__name__}: {exc}")
        return None
    return Member(trial, config.replace(checkpoint_dir=str(trial_checkpoint_dir(job, trial.number))), callback)


def _train(group: Sequence[Member], pack: int) -> list[engine.RunResult]:
    if len(group) == 1 or pack == 1:
        return [engine.train(member.config, [member.callback]) for member in group]
    log.info(f"trials {', '.join(str(member.trial.number) for member in group)}: training fused, one pack")
    return engine.train_fused([member.config for member in group], [[member.callback] for member in group])


def _train_group(study: optuna.Study, group: Sequence[Member], job: StudyJob, parent_run_id: str) -> None:
    """Ctrl-C or SIGTERM marks every trial of the group FAIL, queues its parameters again and re-raises; so does a
    storage unreachable for the whole retry budget, marked as an infrastructure failure. Any other exception
    makes them FAIL (with the error) and the study goes on."""
    try:
        results = _train(group, job.spec.pack)
    except KeyboardInterrupt as interrupt:
        for member in group:
            _fail_and_retry(study, member.trial, job, member.callback, parent_run_id,
                            engine.interrupt_message(interrupt))
        raise
    except ServiceUnavailable as exc:
        for member in group:
            _fail_for_infrastructure(study, member.trial, job, member.callback, parent_run_id, exc)
        raise
    except Exception as exc:
        for member in group:
            _fail(study, member.trial, job, member.callback, parent_run_id, f"{type(exc).__name__}: {exc}")
            keep_checkpoints(study, job, member.trial.number)
        return
    for member, result in zip(group, results):
        _conclude(study, member, job, parent_run_id, result)


def _conclude(study: optuna.Study, member: Member, job: StudyJob, parent_run_id: str,
              result: engine.RunResult) -> None:
    trial, callback = member.trial, member.callback
    if callback.stale:
        log.warning(f"trial {trial.number}: {STALE_MESSAGE}")
        return
    try:
        _record_result(trial, result, callback)
        _tell(study, trial, job, callback, parent_run_id, result)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(f"trial {trial.number}: {STALE_MESSAGE}; its result is dropped (the retry runs it again)")
    else:
        if result.status == RunStatus.COMPLETED:
            keep_final_weights(study, job, trial.number, result)
    keep_checkpoints(study, job, trial.number)


def _fail_for_infrastructure(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback,
                             parent_run_id: str, error: ServiceUnavailable) -> None:
    """Marks the trial FAIL as an infrastructure failure and queues it again, when the storage allows; else it
    stays RUNNING until its heartbeats go stale, and is queued again then."""
    try:
        trial.set_user_attr(FAILURE_ATTR, INFRASTRUCTURE)
        _fail_and_retry(study, trial, job, callback, parent_run_id, str(error), max_retries=None)
    except (ServiceUnavailable, optuna.exceptions.UpdateFinishedTrialError):
        pass


def _tell(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback, parent_run_id: str,
          result: engine.RunResult) -> None:
    if result.status == RunStatus.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"trial {trial.number} PRUNED after {len(result.history)} epoch(s) {trial.params}")
    elif result.status == RunStatus.COMPLETED:
        values = [objective_value(result, metric) for metric in job.spec.metric_names]
        study.tell(trial, values)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in zip(job.spec.metric_names, values))
        log.info(f"trial {trial.number} COMPLETE {shown} in {result.wall_seconds:.1f} s {trial.params}")
    else:
        _fail(study, trial, job, callback, parent_run_id, result.message or result.status)
