"""MLflow's own system metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU utilisation and
memory with ``nvidia-ml-py``) on a run, from MLflow's ``SystemMetricsMonitor`` (psutil, in a thread).

Sampled every ``SAMPLING_INTERVAL`` seconds, so a 30 s run has points; MLflow's environment variables keep
their meaning: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets the interval, and
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns the monitor off like ``--no-system-metrics``. A benchmark
pauses it while it times an epoch (``PausedWhileTimed``): a timed epoch never shares the machine with it.
"""

from __future__ import annotations

import logging
import os

from ..engine import Callback, EpochRecord, RunResult, TrainContext

SAMPLING_INTERVAL = 2.0  # seconds
ENABLE_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
PREFIX = "system/"


def enabled(requested: bool = True) -> bool:
    """Whether to monitor: asked for, and not turned off through MLflow's environment variable."""
    return requested and os.environ.get(ENABLE_ENV, "true").strip().lower() not in ("false", "0", "no", "off")


class SystemMetrics:
    """MLflow's monitor on ``run_id``, which can be stopped and started again: a restart continues the run's
    ``system/`` steps, and a stop logs the samples taken since the last logged point (MLflow's own ``finish``
    drops them, so a short window would leave none)."""

    def __init__(self, tracking_uri: str, run_id: str, interval: float = SAMPLING_INTERVAL) -> None:
        self.tracking_uri, self.run_id, self.interval = tracking_uri, run_id, interval
        self.monitor = None
        self.cpu_seconds = 0.0  # CPU time the monitor's thread used, over every start and stop: its cost

    @property
    def running(self) -> bool:
        return self.monitor is not None

    def start(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self.monitor is not None:
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval, resume_logging=True,
                                            tracking_uri=self.tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        self.cpu_seconds += thread_cpu_seconds(monitor._process.native_id) if monitor._process else 0.0
        monitor.finish()
        if any(part.metrics for part in monitor.monitors):
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()


def thread_cpu_seconds(native_id: int) -> float:
    """User and system CPU seconds of this process's thread ``native_id`` so far (0 once it is gone)."""
    import psutil

    return next((thread.user_time + thread.system_time for thread in psutil.Process().threads()
                 if thread.id == native_id), 0.0)


def start_system_metrics(tracking_uri: str, run_id: str, requested: bool = True) -> SystemMetrics | None:
    """A started monitor on ``run_id``, or None when system metrics are off (``enabled``)."""
    if not enabled(requested):
        return None
    system = SystemMetrics(tracking_uri, run_id)
    system.start()
    return system


class PausedWhileTimed(Callback):
    """Keeps ``system`` (a benchmark's monitor) sampling a repeat's warm-up epochs, which train like the timed
    ones, and stopped while its timed epochs run; it samples again once the repeat ends."""

    def __init__(self, system: SystemMetrics, warmup_epochs: int) -> None:
        self.system, self.warmup_epochs = system, warmup_epochs

    def on_train_start(self, context: TrainContext) -> None:
        if self.warmup_epochs == 0:
            self.system.stop()

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        if record.epoch == self.warmup_epochs:
            self.system.stop()

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        self.system.start()
