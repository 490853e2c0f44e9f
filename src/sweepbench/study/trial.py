"""The objective: a trial suggests its parameters, trains the one engine with them, reports every epoch to the
pruner and tells the study how it ended, as in Optuna's ``pytorch_simple.py`` example. Around that, what a
shared study needs: an MLflow child run per trial, a heartbeat while it trains, and a retry when Ctrl-C or
SIGTERM stops it."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .. import engine
from ..config import RunConfig
from ..tracking import MlflowLogger, Store, config_params
from .job import StudyJob
from .spec import EPOCH_METRICS, ParamSpec, StudySpec
from .storage import ERROR_ATTR, RUN_ID_ATTR, WORKER_ATTR, _heartbeat, retry_trial

log = logging.getLogger(__name__)

MLFLOW_TEXT_LIMIT = 5000


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
            self.trial.set_user_attr(RUN_ID_ATTR, self.logger.run_id)

    def on_epoch_end(self, context: engine.TrainContext, record: engine.EpochRecord) -> None:
        with self._timed():
            self.logger.on_epoch_end(context, record)
            prune = self.prune_metric is not None and self._should_prune(record)
        if prune:
            raise engine.StopTraining(f"pruned by the {type(self.trial.study.pruner).__name__} after epoch "
                                      f"{record.epoch}", status="pruned")

    def _should_prune(self, record: engine.EpochRecord) -> bool:
        self.trial.report(getattr(record, self.prune_metric), record.epoch)
        return self.trial.should_prune()

    def on_train_end(self, context: engine.TrainContext, result: engine.RunResult) -> None:
        with self._timed():
            self.logger.on_train_end(context, result)


def _trial_tags(spec: StudySpec, trial: optuna.Trial) -> dict[str, str]:
    return {"optuna.study_name": spec.name, "optuna.trial_number": str(trial.number)}


def _record_failed_run(job: StudyJob, trial: optuna.Trial, parent_run_id: str, message: str) -> None:
    """A FAILED child run for a trial that failed before training started (a bad config, say): the study's
    settings with the trial's parameters over them, as params."""
    store = Store(job.tracking_uri)
    params = {**config_params(job.spec.base_config), **{name: str(value) for name, value in trial.params.items()}}
    run_id = store.start_run(store.experiment(job.spec.name), f"trial-{trial.number:04d}", "trial",
                             {**_trial_tags(job.spec, trial), "status": "failed"}, params, parent_run_id)
    store.fail_run(run_id, message)
    trial.set_user_attr(RUN_ID_ATTR, run_id)


def _train_trial(trial: optuna.Trial, job: StudyJob, callback: TrialCallback) -> engine.RunResult:
    params = {param.name: suggest(trial, param) for param in job.spec.search}
    config = apply_params(job.spec.base_config, params)
    checkpoint_dir = Path(job.checkpoint_root) / f"trial-{trial.number:04d}"
    return engine.train(config.replace(checkpoint_dir=str(checkpoint_dir)), [callback])


def _record_result(trial: optuna.Trial, result: engine.RunResult, callback: TrialCallback) -> None:
    """``engine_seconds`` is the engine's own time (data, model, training, evaluation), without the callbacks'
    bookkeeping: against the trial's duration in Optuna (ask to tell), it gives the bookkeeping share."""
    attrs = {"epochs_run": len(result.history), "best_epoch": result.best_epoch,
             "test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
             "engine_seconds": result.wall_seconds - callback.seconds, "checkpoint": result.checkpoints.get("best")}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _fail(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback, parent_run_id: str,
          message: str) -> FrozenTrial:
    trial.set_user_attr(ERROR_ATTR, message[:MLFLOW_TEXT_LIMIT])
    if callback.logger.run_id is None:
        _record_failed_run(job, trial, parent_run_id, message)
    log.warning(f"trial {trial.number} FAIL {trial.params}: {message}")
    return study.tell(trial, state=TrialState.FAIL)


def run_trial(study: optuna.Study, trial: optuna.Trial, job: StudyJob, storage: RDBStorage,
              parent_run_id: str) -> None:
    """Trains a reserved trial and tells the study how it ended. An exception makes it FAIL (with its error)
    and the study goes on; Ctrl-C or SIGTERM marks it FAIL, queues its parameters for the next run and re-raises."""
    spec = job.spec
    trial.set_user_attr(WORKER_ATTR, f"{platform.node()}:{os.getpid()}")
    mlflow_logger = MlflowLogger(spec.name, job.tracking_uri, run_name=f"trial-{trial.number:04d}",
                                 parent_run_id=parent_run_id, tags=_trial_tags(spec, trial), log_model=False,
                                 log_artifacts=False, kind="trial")
    single_epoch_metric = len(spec.objectives) == 1 and spec.metric_names[0] in EPOCH_METRICS
    callback = TrialCallback(trial, mlflow_logger, spec.metric_names[0] if single_epoch_metric else None)
    with _heartbeat(storage, trial._trial_id, job.heartbeat_interval):
        try:
            result = _train_trial(trial, job, callback)
        except KeyboardInterrupt as interrupt:
            retry_trial(study, _fail(study, trial, job, callback, parent_run_id, engine.interrupt_message(interrupt)))
            raise
        except Exception as exc:
            _fail(study, trial, job, callback, parent_run_id, f"{type(exc).__name__}: {exc}")
            return
    _record_result(trial, result, callback)
    try:
        _tell(study, trial, job, callback, parent_run_id, result)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(f"trial {trial.number}: already marked FAIL as stale by another worker; its result is dropped")


def _tell(study: optuna.Study, trial: optuna.Trial, job: StudyJob, callback: TrialCallback, parent_run_id: str,
          result: engine.RunResult) -> None:
    if result.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"trial {trial.number} PRUNED after {len(result.history)} epoch(s) {trial.params}")
    elif result.status == "completed":
        values = [objective_value(result, metric) for metric in job.spec.metric_names]
        study.tell(trial, values)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in zip(job.spec.metric_names, values))
        log.info(f"trial {trial.number} COMPLETE {shown} in {result.wall_seconds:.1f} s {trial.params}")
    else:
        _fail(study, trial, job, callback, parent_run_id, result.message or result.status)
