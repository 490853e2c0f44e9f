"""The tracking layer: the only code that speaks to MLflow.

- ``store``: where runs go (URIs), experiments, and the life of a run (``Store``);
- ``schema``: the run schema every run follows (kinds, params, tags), and how old runs are read;
- ``logger``: the engine callback that logs a training run (``MlflowLogger``);
- ``datasets``: the splits a run used, as MLflow dataset inputs;
- ``system``: MLflow's system metrics monitor on a run, paused while a benchmark times an epoch;
- ``models``: trained models logged to their run and registered in the Model Registry with an alias;
- ``reconcile``: RUNNING runs whose process is gone end KILLED (``reconcile_dead_runs``);
- ``ui``: the MLflow UI command.
"""

from ..hardware import environment_tags, git_commit
from .logger import MlflowLogger, train_tracked
from .models import fluent_tracking_uri
from .reconcile import RunningRun, process_tags, reconcile_dead_runs, reconcile_experiment
from .schema import KIND_TAG, RUN_KINDS, SUMMARY_KINDS, TRAINING_KINDS, config_params, config_tags, flatten, run_kind
from .system import PausedWhileTimed, SystemMetrics, start_system_metrics
from .store import (RunOutcome, Store, artifact_root, as_metrics, default_tracking_uri, ensure_experiment,
                    is_server, resolve_tracking_uri, sqlite_path)
from .ui import browse_hint, experiment_url, serve, stop_process_group, ui_command

__all__ = ["KIND_TAG", "RUN_KINDS", "SUMMARY_KINDS", "TRAINING_KINDS", "MlflowLogger", "PausedWhileTimed",
           "RunOutcome", "RunningRun", "Store", "SystemMetrics", "artifact_root", "as_metrics", "browse_hint",
           "config_params", "config_tags", "default_tracking_uri", "ensure_experiment", "environment_tags",
           "experiment_url", "flatten", "fluent_tracking_uri", "git_commit", "is_server", "process_tags",
           "reconcile_dead_runs", "reconcile_experiment", "resolve_tracking_uri", "run_kind", "serve", "sqlite_path",
           "start_system_metrics", "stop_process_group", "train_tracked", "ui_command"]
