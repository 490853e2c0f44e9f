"""The engine callback that logs one training run to the store, in the run schema (``schema``)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from .. import retry
from ..config import RunConfig
from ..engine import Callback, EpochRecord, RunResult, TrainContext, normalise, train
from ..engine.checkpoint import LOCATION_FIELDS, TRACKING_KEY
from ..hardware import environment_record
from ..retry import ServiceUnavailable
from ..status import MlflowStatus, RunStatus, mlflow_status
from .datasets import TEST, TRAINING, VALIDATION, log_splits
from .models import INPUT_EXAMPLE_SIZE, log_model
from .reconcile import process_tags
from .schema import KIND_TAG, config_params, training_tags
from .store import Store, as_metrics
from .system import SystemMetrics, start_system_metrics

log = logging.getLogger(__name__)

RUN_ID_RECORD = "mlflow_run_id"  # the key of the run id in a checkpoint's tracking records
RESUMED_FROM_TAG = "sweepbench.resumed_from"  # the checkpoint a resumed run continued from
RESUMED_AT_TAG = "sweepbench.resumed_at_epoch"
RESUMED_FROM_RUN_TAG = "sweepbench.resumed_from_run"  # a new run's link to the run that wrote its checkpoint
STALE_TAGS = ("error", "stop_reason")  # an interrupted run's; a continued run sets its own at its end


def epoch_metrics(record: EpochRecord) -> list[Metric]:
    return as_metrics({"train_loss": record.train_loss, "val_loss": record.val_loss,
                       "val_accuracy": record.val_accuracy, "epoch_seconds": record.epoch_seconds,
                       "samples_per_second": record.samples_per_second, "lr": record.lr,
                       "eval_seconds": record.eval_seconds}, record.epoch)


def final_metrics(result: RunResult, logging_seconds: float) -> list[Metric]:
    return as_metrics({"test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
                       "best_val_accuracy": result.best_val_accuracy,
                       "time_to_target_seconds": result.time_to_target_seconds,
                       "peak_memory_mb": result.peak_memory_mb, "train_seconds": result.train_seconds,
                       "compile_seconds": result.compile_seconds,
                       "total_seconds": result.wall_seconds, "epoch_logging_seconds": logging_seconds},
                      len(result.history))


def per_class_csv(per_class_accuracy: dict[str, float]) -> str:
    rows = [f'"{name}",{accuracy!r}' for name, accuracy in per_class_accuracy.items()]
    return "\n".join(["class,accuracy", *rows]) + "\n"


class MlflowLogger(Callback):
    """Logs one training run of ``kind`` (``train``, ``trial`` or ``repeat``): params and tags at the start,
    one batch of metrics per epoch, then final metrics and artifacts, and always a terminal status (FINISHED,
    FAILED or KILLED), never RUNNING. A run that resumes a checkpoint continues the checkpoint's run where
    ``continue_from`` finds that honest."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 log_model: bool = True, log_artifacts: bool = True, kind: str = "train",
                 system_metrics: bool = False) -> None:
        self.store = Store(tracking_uri)
        self.experiment, self.kind = experiment, kind
        self.run_name, self.parent_run_id = run_name, parent_run_id
        self.tags = dict(tags or {})
        self.log_model, self.log_artifacts = log_model, log_artifacts
        self.system_metrics = system_metrics  # MLflow's system metrics monitor on the run (``system``)
        self.system: SystemMetrics | None = None
        self.run_id: str | None = None
        self.model_id: str | None = None  # the logged model's, once logged
        self.continued_run_id: str | None = None  # set by ``continue_from``
        self.resumed_from_run: str | None = None
        self.logged_epochs = 0  # epochs the run already has metrics for
        self.outage: str | None = None  # why the tracking store is not being written to, while it is not
        self.start_logging_seconds = self.epoch_logging_seconds = self.end_logging_seconds = 0.0

    @property
    def tracking_uri(self) -> str:
        return self.store.tracking_uri

    @property
    def logging_seconds(self) -> float:
        """Time spent in this callback: what logging adds to the run's wall time."""
        return self.start_logging_seconds + self.epoch_logging_seconds + self.end_logging_seconds

    def _run_name(self, context: TrainContext) -> str:
        config = context.config
        default = f"{config.model}-{config.dataset}-{context.device.type}-{config.precision}-seed{config.seed}"
        return self.run_name or default

    def checkpoint_record(self) -> dict[str, str]:
        """What checkpoints keep of this logger (see ``engine.checkpoint.tracking_records``): the run's id."""
        return {RUN_ID_RECORD: self.run_id} if self.run_id else {}

    def continue_from(self, checkpoint: dict[str, Any], config: RunConfig) -> str:
        """Makes a run that resumes ``checkpoint`` with ``config`` log into the run that wrote the checkpoint
        where that is honest, else into a new run linked to it by a tag; returns one line saying which and why.

        MLflow params cannot change once logged, so the run is continued only if it logged the same params (where
        the data and checkpoints live aside), is of this logger's kind, and has logged no epoch past the
        checkpoint's (resuming best.pt of a run that went on would log those epochs twice)."""
        run_id = checkpoint.get(TRACKING_KEY, {}).get(RUN_ID_RECORD)
        if run_id is None:
            return "the checkpoint names no MLflow run (it was written without MLflow, or before sweepbench kept " \
                   "the run id); logging to a new run"
        reason = self._why_not_continue(run_id, config, checkpoint["epoch"])
        if reason:
            self.resumed_from_run = run_id
            return f"not continuing MLflow run {run_id}: {reason}; logging to a new run tagged {RESUMED_FROM_RUN_TAG}"
        self.continued_run_id = run_id
        return f"continuing MLflow run {run_id} after its epoch {checkpoint['epoch']}"

    def _why_not_continue(self, run_id: str, config: RunConfig, epochs_done: int) -> str | None:
        try:
            run = self.store.client.get_run(run_id)
        except MlflowException:
            return f"it is not in the store at {self.tracking_uri}"
        if run.info.lifecycle_stage == "deleted":
            return "it was deleted"
        if run.data.tags.get(KIND_TAG) != self.kind:
            return f"it is a {run.data.tags.get(KIND_TAG)!r} run, not a {self.kind!r} run"
        ours = {key: value for key, value in config_params(config).items() if key not in LOCATION_FIELDS}
        theirs = {key: value for key, value in run.data.params.items() if key not in LOCATION_FIELDS}
        changed = sorted(key for key in {*ours, *theirs} if ours.get(key) != theirs.get(key))
        if changed:
            return f"{', '.join(changed)} differ from the params it logged, which MLflow cannot change"
        history = self.store.client.get_metric_history(run_id, "val_accuracy")
        logged_epochs = max((metric.step for metric in history), default=0)
        if logged_epochs > epochs_done:
            return f"it has logged {logged_epochs} epochs, more than the checkpoint's {epochs_done}"
        self.logged_epochs = logged_epochs
        self.experiment = self.store.client.get_experiment(run.info.experiment_id).name
        return None

    def on_train_start(self, context: TrainContext) -> None:
        started = time.perf_counter()
        try:
            self._open_run(context)
        except ServiceUnavailable as outage:
            self._defer(outage)
        self.start_logging_seconds = time.perf_counter() - started

    def _defer(self, outage: ServiceUnavailable) -> None:
        """The tracking store stayed unreachable: training goes on, its records wait in the run's history and
        are logged once the store answers again (tried at each epoch's end and at the run's end)."""
        self.outage = str(outage)

    def _catch_up(self, context: TrainContext, seconds: float = 0) -> bool:
        """After an outage: opens the run and logs the epochs it missed, retrying for ``seconds`` (0: one quick
        try); True once logged."""
        try:
            with retry.budget(seconds):
                if self.run_id is None:
                    self._open_run(context)
                for record in context.history[self.logged_epochs:]:
                    self._log_epoch(record)
        except ServiceUnavailable:
            return False
        self.outage = None
        return True

    def _log_epoch(self, record: EpochRecord) -> None:
        self.store.log(self.run_id, metrics=epoch_metrics(record))
        self.logged_epochs = record.epoch

    def _open_run(self, context: TrainContext) -> None:
        tags = {**training_tags(context), **self.tags, **self._resume_tags(context), **process_tags()}
        if self.continued_run_id:
            self.run_id = self.continued_run_id
            self.store.reopen(self.run_id)
            stale = set(STALE_TAGS) & set(self.store.client.get_run(self.run_id).data.tags)
            for key in sorted(stale):
                self.store.client.delete_tag(self.run_id, key)
            self.store.log(self.run_id, tags=tags)
        else:
            experiment_id = self.store.experiment(self.experiment)
            self.run_id = self.store.start_run(experiment_id, self._run_name(context), self.kind, tags,
                                               config_params(context.config), self.parent_run_id)
        log_splits(self.store, self.run_id, context.dataset, context.config, (TRAINING, VALIDATION))
        self.system = start_system_metrics(self.tracking_uri, self.run_id, self.system_metrics)
        for record in context.history[self.logged_epochs:]:  # a resumed run's earlier epochs it has no metrics for
            self._log_epoch(record)

    def _resume_tags(self, context: TrainContext) -> dict[str, str]:
        if not context.config.resume:
            return {}
        tags = {RESUMED_FROM_TAG: context.config.resume, RESUMED_AT_TAG: str(len(context.history))}
        if self.resumed_from_run:
            tags[RESUMED_FROM_RUN_TAG] = self.resumed_from_run
        return tags

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        started = time.perf_counter()
        if self.outage is None:
            try:
                self._log_epoch(record)
            except ServiceUnavailable as outage:
                self._defer(outage)
        else:
            self._catch_up(context)
        self.epoch_logging_seconds += time.perf_counter() - started

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        """Final metrics, artifacts and the run's end. After an outage, the run first catches up (within the
        retry budget). A store still (or newly) down leaves ``outage`` set and the run RUNNING, for
        ``sweepbench runs reconcile`` or the study's reconciliation: the result itself is never lost to it."""
        if self.system is not None:
            self.system.stop()
        if self.outage is not None and not self._catch_up(context, retry.retry_budget()):
            self._warn_unfinished()
            return
        if self.run_id is None:
            return
        started = time.perf_counter()
        try:
            self._end_run(context, result)
        except ServiceUnavailable as outage:
            self._defer(outage)
            self._warn_unfinished()
        finally:
            self.end_logging_seconds = time.perf_counter() - started

    def _warn_unfinished(self) -> None:
        log.warning(f"{self.run_name or 'run'}: not logged to its end, the MLflow tracking store is unreachable; "
                    "the next study run (or `sweepbench runs reconcile`) completes it")

    def _end_run(self, context: TrainContext, result: RunResult) -> None:
        status, tags = mlflow_status(result.status), {"status": str(result.status)}
        if result.message:
            tags["error" if status == MlflowStatus.FAILED else "stop_reason"] = result.message
        try:
            self.store.log(self.run_id, metrics=final_metrics(result, self.epoch_logging_seconds))
            if result.test_accuracy is not None:
                log_splits(self.store, self.run_id, context.dataset, context.config, (TEST,))
            if self.log_artifacts:
                self._log_artifacts(context, result)
        except ServiceUnavailable:
            raise  # the store is down: the run cannot be ended either
        except KeyboardInterrupt:
            self.store.end_run(self.run_id, MlflowStatus.KILLED, tags)
            raise
        except BaseException as exc:
            tags["error"] = f"logging failed: {type(exc).__name__}: {exc}"
            self.store.end_run(self.run_id, MlflowStatus.FAILED, tags)
            raise
        self.store.end_run(self.run_id, status, tags, self._ended_name(result))

    def _ended_name(self, result: RunResult) -> str | None:
        """A pruned run is FINISHED in MLflow (``status.STATUS_TABLE``); its name says it was pruned."""
        if result.status != RunStatus.PRUNED:
            return None
        return f"{self.store.client.get_run(self.run_id).info.run_name} [{RunStatus.PRUNED}]"

    def _log_artifacts(self, context: TrainContext, result: RunResult) -> None:
        from .. import report

        self.store.log_dict(self.run_id, environment_record(context.device), "environment.json")
        for path in result.checkpoints.values():
            if Path(path).exists():
                self.store.log_artifact(self.run_id, path, "checkpoints")
        if result.history:
            self.store.log_figure(self.run_id, report.plot_learning_curve(result.history), "learning_curve.png")
        if result.confusion_matrix:
            self.store.log_figure(self.run_id, report.plot_confusion_matrix(result.confusion_matrix,
                                                                            context.dataset.classes),
                                  "confusion_matrix.png")
        if result.per_class_accuracy:
            self.store.log_text(self.run_id, per_class_csv(result.per_class_accuracy), "per_class_accuracy.csv")
        if self.log_model and result.status == RunStatus.COMPLETED:
            self._log_model(context)

    def _log_model(self, context: TrainContext) -> None:
        """The trained model, with a few validation images as its input example (``models.log_model``)."""
        dataset = context.dataset
        example = normalise(dataset.x_val[:INPUT_EXAMPLE_SIZE], dataset.mean, dataset.std).numpy()
        self.model_id = log_model(self.store, self.run_id, context.model, example, len(context.history))


def train_tracked(config: RunConfig, logger: MlflowLogger, callbacks: Sequence[Callback] = ()) -> RunResult:
    """``engine.train`` with ``logger`` last among the callbacks. A run that logs artifacts but has no
    ``checkpoint_dir`` writes its checkpoints to a temporary folder, so both still get logged."""
    if config.checkpoint_dir or not logger.log_artifacts:
        return train(config, [*callbacks, logger])
    with tempfile.TemporaryDirectory(prefix="sweepbench-checkpoints-") as directory:
        return train(config.replace(checkpoint_dir=directory), [*callbacks, logger])
