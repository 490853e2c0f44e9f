"""The objective: a trial suggests its parameters, trains the one engine with them, reports every epoch to the
pruner and ends through ``ending.finish_trial``, as in Optuna's ``pytorch_simple.py`` example. Around that,
what a shared study needs: an MLflow child run per trial and a quiet stop when another worker failed it as stale
while this one was paused (its worker records its heartbeats: ``coordination.run_worker``). A
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
from ..tracking import MlflowLogger
from .checkpoints import trial_checkpoint_dir
from .ending import STALE_MESSAGE, Ending, Outcome, finish_trial
from .identity import VERSION_ATTR, VERSION_TAG
from .job import StudyJob
from .spec import EPOCH_METRICS, ParamSpec, StudySpec
from .storage import RUN_ID_ATTR, WORKER_ATTR

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
                prune = self.prune_metric is not None and self._should_prune(record, context.config.epochs)
            except optuna.exceptions.UpdateFinishedTrialError:
                self.stale = True
        if self.stale:
            raise engine.StopTraining(STALE_MESSAGE, status=RunStatus.STOPPED)
        if prune:
            raise engine.StopTraining(f"pruned by the {type(self.trial.study.pruner).__name__} after epoch "
                                      f"{record.epoch}", status=RunStatus.PRUNED)

    def _should_prune(self, record: engine.EpochRecord, epochs: int) -> bool:
        """Reports every epoch, the last included (the pruner compares later trials with it), but asks the pruner
        only before the last: pruning then saves no training and would throw away a finished trial's value."""
        self.trial.report(getattr(record, self.prune_metric), record.epoch)
        return record.epoch < epochs and self.trial.should_prune()

    def on_train_end(self, context: engine.TrainContext, result: engine.RunResult) -> None:
        with self._timed():
            self.logger.on_train_end(context, result)
            if not self.stale:
                self._link_run()


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


@dataclass
class Member:
    """A reserved trial ready to train: its config (the spec's with the trial's parameters) and its callback."""

    trial: optuna.Trial
    config: RunConfig
    callback: TrialCallback


def run_trials(study: optuna.Study, trials: Sequence[optuna.Trial], job: StudyJob, parent_run_id: str) -> None:
    """Trains reserved trials (whose heartbeats the worker records meanwhile) and ends each
    (``ending.finish_trial``): those that can share a pack (``engine.fused``) train fused when the spec's
    ``pack`` is above 1, the others one by one. A trial whose parameters make no valid config FAILs at once."""
    try:
        members = [member for member in (_prepare(study, trial, job, parent_run_id) for trial in trials) if member]
        for group in engine.pack_groups([member.config for member in members]):
            _train_group(study, [members[index] for index in group], job, parent_run_id)
    except KeyboardInterrupt as interrupt:
        release(study, trials, job, engine.interrupt_message(interrupt))
        raise


def release(study: optuna.Study, trials: Sequence[optuna.Trial], job: StudyJob, message: str) -> None:
    """Ctrl-C or SIGTERM before or between trainings: the reserved trials still RUNNING (not started yet, or
    waiting for their pack) end interrupted, queued again, as an interrupted training's do."""
    for trial in trials:
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            finish_trial(study, trial, job, Outcome(Ending.INTERRUPTED, message))


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
        finish_trial(study, trial, job, Outcome(Ending.FAILED, f"{type(exc).__name__}: {exc}"), callback,
                     parent_run_id)
        return None
    return Member(trial, config.replace(checkpoint_dir=str(trial_checkpoint_dir(job, trial.number))), callback)


def _train(group: Sequence[Member], pack: int) -> list[engine.RunResult]:
    if len(group) == 1 or pack == 1:
        return [engine.train(member.config, [member.callback]) for member in group]
    log.info(f"trials {', '.join(str(member.trial.number) for member in group)}: training fused, one pack")
    return engine.train_fused([member.config for member in group], [[member.callback] for member in group])


def _train_group(study: optuna.Study, group: Sequence[Member], job: StudyJob, parent_run_id: str) -> None:
    """Trains a group and ends each of its trials: interrupted on Ctrl-C or SIGTERM, infrastructure when a
    storage stayed unreachable for the whole retry budget (both re-raised: the worker stops), failed on any other
    exception (the study goes on), else as its training ended (stale when another worker failed it meanwhile)."""
    try:
        results = _train(group, job.spec.pack)
    except KeyboardInterrupt as interrupt:
        interrupted = Outcome(Ending.INTERRUPTED, engine.interrupt_message(interrupt))
        _finish_group(study, group, job, parent_run_id, interrupted)
        raise
    except ServiceUnavailable as exc:
        _finish_group(study, group, job, parent_run_id, Outcome(Ending.INFRASTRUCTURE, str(exc)))
        raise
    except Exception as exc:
        _finish_group(study, group, job, parent_run_id, Outcome(Ending.FAILED, f"{type(exc).__name__}: {exc}"))
        return
    for member, result in zip(group, results):
        outcome = Outcome(Ending.STALE) if member.callback.stale else Outcome.of(result)
        finish_trial(study, member.trial, job, outcome, member.callback, parent_run_id)


def _finish_group(study: optuna.Study, group: Sequence[Member], job: StudyJob, parent_run_id: str,
                  outcome: Outcome) -> None:
    for member in group:
        finish_trial(study, member.trial, job, outcome, member.callback, parent_run_id)
