"""MLflow tracking: where runs go, and the engine callback that logs a training run to it.

The embedded store is SQLite in ``<project>/mlruns/mlflow.db`` with artifacts beside it (MLflow 3 refuses the
``./mlruns`` file store). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point the same code at a tracking server.
``MlflowLogger`` talks to the store through an explicit ``MlflowClient``, never the fluent active-run API, so
several loggers, processes and nested child runs can share one store.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from .config import RunConfig
from .engine import Callback, EpochRecord, RunResult, TrainContext, device_name, normalise, train

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORE_DIR = "mlruns"
STORE_DB = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
MODEL_NAME = "model"
INPUT_EXAMPLE_SIZE = 4
MAX_MESSAGE_LENGTH = 5000
LOCAL_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")

RUN_STATUS = {
    "completed": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "killed": "KILLED",
    "pruned": "KILLED",
    "stopped": "KILLED",
}


def default_tracking_uri() -> str:
    store = Path.cwd().resolve() / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / STORE_DB}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()


def _scheme(tracking_uri: str) -> str:
    return tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if _scheme(tracking_uri) != "sqlite":
        return None
    return Path(tracking_uri.split(":///", 1)[1]).resolve()


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, under the project's ``mlruns/`` for
    another database, and wherever the server decides for a tracking server (None)."""
    database = sqlite_path(tracking_uri)
    if database is not None:
        return (database.parent / ARTIFACTS_DIR).as_uri()
    if _scheme(tracking_uri) in LOCAL_DATABASE_SCHEMES:
        return (Path.cwd().resolve() / STORE_DIR / ARTIFACTS_DIR).as_uri()
    return None


def ensure_experiment(name: str, tracking_uri: str) -> str:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None outside a git checkout."""
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def environment_tags(device: torch.device) -> dict[str, str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    tags = {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "cudnn_version": str(cudnn) if cudnn else "none",
        "host": platform.node(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def environment_record(device: torch.device) -> dict[str, Any]:
    """What ``environment.json`` holds: the tags plus the library versions and threads behind a figure."""
    import pandas

    return {
        **environment_tags(device),
        "mlflow_version": mlflow.__version__,
        "numpy_version": np.__version__,
        "pandas_version": pandas.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model_kwargs": {"hidden_size": 32}}`` -> ``{"model_kwargs.hidden_size": "32"}``."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def run_tags(context: TrainContext) -> dict[str, str]:
    return {
        "precision": context.config.precision,
        "loader": context.config.loader,
        "dataset": context.dataset.name,
        "dataset_fingerprint": context.dataset.fingerprint,
        "dataset_source": context.dataset.source,
        "status": "running",
    }


def as_metrics(values: dict[str, float | None], step: int) -> list[Metric]:
    """``values`` as MLflow metrics at ``step``, one timestamp for all; None values are left out."""
    timestamp = int(time.time() * 1000)
    return [Metric(key, float(value), timestamp, step) for key, value in values.items() if value is not None]


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
                       "total_seconds": result.wall_seconds, "epoch_logging_seconds": logging_seconds},
                      len(result.history))


def per_class_csv(per_class_accuracy: dict[str, float]) -> str:
    rows = [f'"{name}",{accuracy!r}' for name, accuracy in per_class_accuracy.items()]
    return "\n".join(["class,accuracy", *rows]) + "\n"


def _batched(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MlflowLogger(Callback):
    """Logs one training run: params and tags at the start, one ``log_batch`` per epoch, then final metrics
    and artifacts, and always a terminal status (FINISHED, FAILED or KILLED), never RUNNING."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 log_model: bool = True, log_artifacts: bool = True) -> None:
        self.experiment = experiment
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_name, self.parent_run_id = run_name, parent_run_id
        self.tags = dict(tags or {})
        self.log_model, self.log_artifacts = log_model, log_artifacts
        self.client = MlflowClient(self.tracking_uri)
        self.run_id: str | None = None
        self.start_logging_seconds = self.epoch_logging_seconds = self.end_logging_seconds = 0.0

    @property
    def logging_seconds(self) -> float:
        """Time spent in this callback: what logging adds to the run's wall time."""
        return self.start_logging_seconds + self.epoch_logging_seconds + self.end_logging_seconds

    def _run_name(self, context: TrainContext) -> str:
        config = context.config
        default = f"{config.model}-{config.dataset}-{context.device.type}-{config.precision}-seed{config.seed}"
        return self.run_name or default

    def on_train_start(self, context: TrainContext) -> None:
        started = time.perf_counter()
        experiment_id = ensure_experiment(self.experiment, self.tracking_uri)
        tags = {**environment_tags(context.device), **run_tags(context), **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(experiment_id, tags=tags, run_name=self._run_name(context))
        self.run_id = run.info.run_id
        params = [Param(key, value) for key, value in flatten(context.config.to_dict()).items()]
        for batch in _batched(params, 100):
            self.client.log_batch(self.run_id, params=batch)
        self.start_logging_seconds = time.perf_counter() - started

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        started = time.perf_counter()
        self.client.log_batch(self.run_id, metrics=epoch_metrics(record))
        self.epoch_logging_seconds += time.perf_counter() - started

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        if self.run_id is None:
            return
        started = time.perf_counter()
        status, tags = RUN_STATUS.get(result.status, "FAILED"), {"status": result.status}
        if result.message:
            tags["error" if status == "FAILED" else "stop_reason"] = result.message[:MAX_MESSAGE_LENGTH]
        try:
            self.client.log_batch(self.run_id, metrics=final_metrics(result, self.epoch_logging_seconds),
                                  tags=[RunTag(key, value) for key, value in tags.items()])
            if self.log_artifacts:
                self._log_artifacts(context, result)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as exc:
            status = "FAILED"
            self.client.set_tag(self.run_id, "error",
                                f"logging failed: {type(exc).__name__}: {exc}"[:MAX_MESSAGE_LENGTH])
            raise
        finally:
            self.client.set_terminated(self.run_id, status)
            self.end_logging_seconds = time.perf_counter() - started

    def _log_artifacts(self, context: TrainContext, result: RunResult) -> None:
        from . import report

        self.client.log_dict(self.run_id, environment_record(context.device), "environment.json")
        for path in result.checkpoints.values():
            if Path(path).exists():
                self.client.log_artifact(self.run_id, path, "checkpoints")
        if result.history:
            self._log_figure(report.plot_learning_curve(result.history), "learning_curve.png")
        if result.confusion_matrix:
            self._log_figure(report.plot_confusion_matrix(result.confusion_matrix, context.dataset.classes),
                             "confusion_matrix.png")
        if result.per_class_accuracy:
            self.client.log_text(self.run_id, per_class_csv(result.per_class_accuracy), "per_class_accuracy.csv")
        if self.log_model and result.status == "completed":
            self._log_model(context)

    def _log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def _log_model(self, context: TrainContext) -> None:
        """Logs the trained model as a ``torch.export`` program (loading it runs no pickled code), on CPU,
        with a signature and a few validation images as input example, linked to the run's final metrics.
        Requirements are given, not inferred: inferring them loads the model again in a subprocess (seconds).
        MLflow's serving-input check (load the model back, predict the example) is skipped: a third of the
        model's logging time, and tests/test_tracking.py loads the logged model and checks its predictions."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        model = _cpu_copy(context.model)
        example = normalise(context.dataset.x_val[:INPUT_EXAMPLE_SIZE], context.dataset.mean,
                            context.dataset.std).numpy()
        with torch.inference_mode():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id)
        with fluent_tracking_uri(self.tracking_uri):
            mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example,
                                     serialization_format="pt2", model_id=logged.model_id, run_id=self.run_id,
                                     step=len(context.history), validate_serving_input=False,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self.client.finalize_logged_model(logged.model_id, "READY")


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Points MLflow's global tracking URI at ``uri`` for a call that knows no other (``log_model``), then puts
    back both the global and ``MLFLOW_TRACKING_URI``, which setting the global also overwrites: child processes
    started later must not inherit this store."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    previous_env = os.environ.get(TRACKING_URI_ENV)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous_env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous_env


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).cpu().eval()


def is_server(tracking_uri: str) -> bool:
    return _scheme(tracking_uri) in ("http", "https")


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` for a database store, with one worker: enough for one person, light on a laptop."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    root = artifact_root(tracking_uri)
    return command + (["--default-artifact-root", root] if root else [])


def serve(command: Sequence[str], stop_timeout: float = 15) -> int:
    """Runs a server command in its own session until it exits or Ctrl-C; then stops its whole process
    group (``mlflow ui`` starts uvicorn as a child, which must not outlive it)."""
    process = subprocess.Popen(list(command), start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_process_group(process, stop_timeout)
        raise


def stop_process_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the process group led by ``process``; then SIGKILL to whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def train_tracked(config: RunConfig, logger: MlflowLogger, callbacks: Sequence[Callback] = ()) -> RunResult:
    """``engine.train`` with ``logger`` last among the callbacks. A run that logs artifacts but has no
    ``checkpoint_dir`` writes its checkpoints to a temporary folder, so both still get logged."""
    if config.checkpoint_dir or not logger.log_artifacts:
        return train(config, [*callbacks, logger])
    with tempfile.TemporaryDirectory(prefix="sweepbench-checkpoints-") as directory:
        return train(config.replace(checkpoint_dir=directory), [*callbacks, logger])
