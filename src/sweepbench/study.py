"""Optuna studies over the one engine, tracked in MLflow as one parent run with a child run per trial.

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
failures only when they run out of retries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock
import numpy as np
import optuna
import pandas as pd
import sqlalchemy
import torch
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from . import engine
from .config import ConfigError, RunConfig
from .spec import EPOCH_METRICS, ParamSpec, StudySpec
from .tracking import MlflowLogger, Store, config_params, environment_tags, resolve_tracking_uri

log = logging.getLogger(__name__)

STUDIES_DIR = Path("mlruns") / "studies"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
WORKER_ATTR = "worker"
SEED_CLAIM_ATTR = "sampler_seed_claim"  # study user attrs "sampler_seed_claim.<trials>.<worker index>": host:pid
RETRY_HISTORY = "retry_history"
DEFAULT_HEARTBEAT_SECONDS = 10
GRACE_HEARTBEATS = 3
MAX_RETRIES = 2
POLL_SECONDS = 1.0
INTERRUPT_GRACE_SECONDS = 3
MLFLOW_TEXT_LIMIT = 5000
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker process needs to work on a study: picklable, so spawned workers get it whole."""

    spec: StudySpec
    storage_url: str
    tracking_uri: str
    checkpoint_root: str
    heartbeat_interval: int = DEFAULT_HEARTBEAT_SECONDS
    workers: int = 1


def make_job(spec: StudySpec, storage_url: str | None = None, tracking_uri: str | None = None,
             workers: int = 1, heartbeat_interval: int | None = None) -> StudyJob:
    """Fills in the defaults: the study's SQLite file in ``mlruns/studies/`` and the embedded MLflow store."""
    heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS if heartbeat_interval is None else heartbeat_interval
    for option, value in (("--workers", workers), ("--heartbeat-interval", heartbeat_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option}: {value!r} is out of range; it must be an integer >= 1")
    return StudyJob(spec, normalize_storage_url(storage_url or default_storage_url(spec.name)),
                    resolve_tracking_uri(tracking_uri),
                    str(Path.cwd().resolve() / STUDIES_DIR / spec.name), heartbeat_interval, workers)


def default_storage_url(study_name: str) -> str:
    directory = Path.cwd().resolve() / STUDIES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / study_name}.db"


def normalize_storage_url(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, while
    this package depends on psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def redact(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks heartbeats, metric names and its matplotlib plots experimental, and warns when ask-and-tell
    meets heartbeats; none of that is news to a user of this module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def configure_logging() -> None:
    """One line per trial from this module; Optuna's own chatter only when it is a warning."""
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(job: StudyJob) -> RDBStorage:
    sqlite = job.storage_url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    with _quiet(), storage_lock(job.storage_url):
        return RDBStorage(job.storage_url, engine_kwargs=engine_kwargs, heartbeat_interval=job.heartbeat_interval,
                          grace_period=GRACE_HEARTBEATS * job.heartbeat_interval,
                          heartbeat_stale_trial_callback=StaleTrialHandler(job.tracking_uri))


def create_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    startup = {} if spec.sampler_startup_trials is None else {"n_startup_trials": spec.sampler_startup_trials}
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    return GridSampler({param.name: param.grid_values() for param in spec.search}, seed=seed)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is done: that call only works inside
    ``Study.optimize``, and the workers here stop at ``target_trials()`` (capped at the grid's size) anyway."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


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


def load_study(job: StudyJob, storage: RDBStorage, worker_index: int | None = None) -> optuna.Study:
    """Creates the study, or loads it to resume; its directions must match the spec's. A worker (``worker_index``
    given) gets the spec's sampler with its own seed; without one the study is only read and written to."""
    spec = job.spec
    with _quiet():
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                    load_if_exists=True, pruner=create_pruner(spec))
        stored = [direction.name.lower() for direction in study.directions]
        if stored != spec.directions:
            raise ConfigError(f"objective: study {spec.name!r} in {redact(job.storage_url)} optimises {stored}, "
                              f"the spec {spec.directions}; rename the study or use another storage")
        if study.metric_names != spec.metric_names:
            study.set_metric_names(spec.metric_names)
    if worker_index is not None:
        study.sampler = create_sampler(spec, worker_seed(spec, study, job.storage_url, worker_index))
    return study


def open_existing_study(name: str, storage_url: str | None = None) -> optuna.Study:
    """Loads a study for reading; the error lists the studies the storage does hold."""
    url = normalize_storage_url(storage_url or default_storage_url(name))
    names = optuna.get_all_study_names(url)
    if name not in names:
        raise ConfigError(f"study: no study {name!r} in {redact(url)}; studies there: {', '.join(names) or 'none'}")
    with _quiet():
        return optuna.load_study(study_name=name, storage=url)


ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sweepbench.study").digest()[:8], "big", signed=True)


@contextlib.contextmanager
def storage_lock(storage_url: str) -> Iterator[None]:
    """One lock per storage, held for milliseconds: around creating its tables (two workers starting on an empty
    database would both create them) and around each trial reservation (see the module docstring)."""
    url = sqlalchemy.engine.make_url(storage_url)
    if url.get_backend_name() == "postgresql":
        with _lock_engine(storage_url).connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    path = Path(f"{database}.lock") if database else Path.cwd() / STUDIES_DIR / "storage.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path)):
        yield


@functools.lru_cache(maxsize=4)
def _lock_engine(storage_url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(storage_url, pool_size=1, pool_pre_ping=True)


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
            failed=sum(trial.state == TrialState.FAIL and trial.number not in retried for trial in trials),
        )

    def settled(self, spec: StudySpec) -> bool:
        return self.finished >= spec.target_trials() or self.failed >= spec.max_failed_trials

    def has_slot(self, spec: StudySpec) -> bool:
        return self.finished + self.running < spec.target_trials()


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retries: int = MAX_RETRIES) -> bool:
    """Queues a trial that did not end on its own (dead worker, Ctrl-C) to run again with the same parameters,
    at most ``max_retries`` times. Optuna's own retry callback copies the user attributes too (the old
    MLflow run id, the error); this one keeps only the parameters and the retry history."""
    history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
    if len(history) > max_retries:
        return False
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions,
                                              system_attrs={RETRY_HISTORY: history}))
    return True


class StaleTrialHandler:
    """Called by Optuna for a RUNNING trial whose heartbeats stopped (now FAIL): closes its MLflow child run as
    FAILED and queues it again."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            Store(self.tracking_uri).fail_run(run_id, "its worker stopped sending heartbeats (killed?)")
        retried = retry_trial(study, trial)
        log.warning(f"trial {trial.number}: its worker stopped sending heartbeats; marked FAIL"
                    + (", queued again" if retried else f", not retried ({MAX_RETRIES} retries used)"))


@contextlib.contextmanager
def _heartbeat(storage: RDBStorage, trial_id: int, interval: int) -> Iterator[None]:
    """Records the trial's heartbeat every ``interval`` seconds, as ``Study.optimize`` does. A database that is
    busy for a moment costs one beat, not the thread (a silent thread would make a live trial look dead)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except sqlalchemy.exc.OperationalError as exc:
                log.warning(f"heartbeat of trial id {trial_id} skipped: {exc}")

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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


def _fail_stale_trials(study: optuna.Study) -> None:
    with _quiet():
        optuna.storages.fail_stale_trials(study)


def run_worker(job: StudyJob, worker_index: int = 0) -> None:
    """Reserves and runs trials until the study is settled (see the module docstring) or the timeout passes."""
    storage = open_storage(job)
    study = load_study(job, storage, worker_index)
    parent_run_id = study.user_attrs[PARENT_RUN_ATTR]
    deadline = None if job.spec.timeout is None else time.monotonic() + job.spec.timeout
    while deadline is None or time.monotonic() < deadline:
        _fail_stale_trials(study)
        with storage_lock(job.storage_url):
            tally = Tally.of(study.get_trials(deepcopy=False))
            if tally.settled(job.spec):
                return
            trial = _ask(study, storage) if tally.has_slot(job.spec) else None
        if trial is None:
            time.sleep(POLL_SECONDS)
        else:
            run_trial(study, trial, job, storage, parent_run_id)


def _ask(study: optuna.Study, storage: RDBStorage) -> optuna.Trial:
    """A new (or queued) trial, with its first heartbeat at once: a trial without one never goes stale."""
    with _quiet():
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    return trial


def _worker_process(job: StudyJob, worker_index: int) -> None:
    """Entry point of a spawned local worker: a fair share of the CPU threads, then the worker loop."""
    configure_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    try:
        with engine.sigterm_interrupts():
            run_worker(job, worker_index)
    except engine.Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)


def _run_workers(job: StudyJob) -> None:
    if job.workers == 1:
        run_worker(job)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process, args=(job, index), name=f"sweepbench-worker-{index}")
                 for index in range(job.workers)]
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
        raise RuntimeError(f"worker process(es) exited abnormally: {crashed}")


def _stop_workers(processes: list[multiprocessing.process.BaseProcess], signum: int) -> None:
    """After Ctrl-C or SIGTERM: a terminal's Ctrl-C (or a scheduler's SIGTERM to the process group) reaches every
    worker, which marks its trial and stops; a signal sent to this process alone is passed on to the workers
    still running after a grace period."""
    deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signum)
    for process in processes:
        process.join()


def _open_parent_run(study: optuna.Study, job: StudyJob, store: Store) -> str:
    """The study's MLflow parent run: created once (its id kept in the study), reopened on every resume."""
    with storage_lock(job.storage_url):
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id and store.reopen(run_id):
            return run_id
        run_id = _create_parent_run(store, job)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id


def _create_parent_run(store: Store, job: StudyJob) -> str:
    spec = job.spec
    device = engine.resolve_device(spec.base_config.device)
    tags = {**environment_tags(device), "optuna.study_name": spec.name, "optuna.storage": redact(job.storage_url),
            "spec": spec.source, "description": spec.description}
    search = "; ".join(f"{param.name}: {_describe(param)}" for param in spec.search)
    params = {"model": spec.base_config.model, "dataset": spec.base_config.dataset,
              "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives),
              "sampler": spec.sampler, "sampler_seed": spec.sampler_seed, "pruner": spec.pruner,
              "pruner_options": spec.pruner_options, "search_space": search[:MLFLOW_TEXT_LIMIT]}
    experiment_id = store.experiment(spec.name, spec.description or None)
    return store.start_run(experiment_id, f"study-{spec.name}", "study", tags, params)


def _describe(param: ParamSpec) -> str:
    if param.type == "categorical":
        return f"one of {list(param.choices)}"
    extras = (" log" if param.log else "") + (f" step {param.step:g}" if param.step else "")
    return f"{param.type} [{param.low:g}, {param.high:g}]{extras}"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial; for a Pareto study, the front's best on the first objective."""
    candidates = study.best_trials if len(study.directions) > 1 else study.get_trials(states=(TrialState.COMPLETE,))
    if not candidates:
        return None
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(candidates, key=lambda trial: sign * trial.values[0])


def log_study_outcome(study: optuna.Study, job: StudyJob, store: Store, parent_run_id: str) -> None:
    """Logs the study's outcome to its parent run: trial counts, the best trial (number, params, values,
    checkpoint), the trials table as CSV, Optuna's plots as PNG."""
    trials = study.get_trials(deepcopy=False)
    counts = {f"n_{state.name.lower()}": sum(t.state == state for t in trials) for state in TrialState}
    metrics: dict[str, float] = dict(counts)
    tags = {"n_trials_target": str(job.spec.target_trials())}
    best = best_trial(study)
    if best is not None:
        metrics.update({f"best_{name}": value for name, value in zip(job.spec.metric_names, best.values)})
        metrics["best_trial_number"] = best.number
        tags.update({"best_trial_number": str(best.number), "best_run_id": best.user_attrs.get(RUN_ID_ATTR, ""),
                     **{f"best.{name}": str(value) for name, value in best.params.items()}})
        _log_checkpoint(store, parent_run_id, best, tags)
    if len(study.directions) > 1:
        tags["pareto_trial_numbers"] = ",".join(str(trial.number) for trial in study.best_trials)
    store.log(parent_run_id, metrics=metrics, tags=tags, step=Tally.of(trials).finished)
    store.log_text(parent_run_id, export_trials(study, "csv"), "trials.csv")
    if Path(job.spec.source).is_file():
        store.log_artifact(parent_run_id, job.spec.source, "spec")
    _log_plots(store, parent_run_id, study, job.spec)


def _log_checkpoint(store: Store, parent_run_id: str, best: FrozenTrial, tags: dict[str, str]) -> None:
    """Links the best trial's checkpoint: its path as a tag, and the file itself when it is on this machine."""
    path = best.user_attrs.get("checkpoint")
    if path:
        tags["best_checkpoint"] = path
        if Path(path).is_file():
            store.log_artifact(parent_run_id, path, "best_checkpoint")


def _study_plots(study: optuna.Study, spec: StudySpec) -> dict[str, Callable[[], Any]]:
    from optuna.visualization import matplotlib as plots

    target = {}
    if len(spec.objectives) > 1:
        target = {"target": lambda trial: trial.values[0], "target_name": spec.metric_names[0]}
    figures = {
        "optimization_history": lambda: plots.plot_optimization_history(study, **target),
        "param_importances": lambda: plots.plot_param_importances(study, **target),
        "parallel_coordinate": lambda: plots.plot_parallel_coordinate(study, **target),
        "intermediate_values": lambda: plots.plot_intermediate_values(study),
    }
    if len(spec.objectives) > 1:
        figures["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=spec.metric_names)
    return figures


def _log_plots(store: Store, run_id: str, study: optuna.Study, spec: StudySpec) -> None:
    """Optuna's matplotlib plots (no plotly or kaleido needed); a plot the data cannot make yet (importances
    from one trial, say) is skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")

    for name, plot in _study_plots(study, spec).items():
        try:
            with _quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # matplotlib on a flat axis: cosmetic
                axes = plot()
        except (ValueError, RuntimeError) as exc:
            log.warning(f"plot {name} skipped: {exc}")
            continue
        axes.figure.tight_layout()
        store.log_figure(run_id, axes.figure, f"plots/{name}.png")


@dataclass
class StudyOutcome:
    study: optuna.Study
    job: StudyJob
    parent_run_id: str
    status: str
    tally: Tally
    finished_before: int
    wall_seconds: float

    @property
    def trials_per_minute(self) -> float:
        return 60 * (self.tally.finished - self.finished_before) / self.wall_seconds

    def describe(self) -> str:
        """What ``sweepbench study run`` ends with: the comparison table, the figures, where to browse."""
        from .tracking import Store, browse_hint

        experiment_id = Store(self.job.tracking_uri).experiment(self.job.spec.name)
        ui = browse_hint(self.job.tracking_uri, experiment_id)
        return "\n".join([
            describe_study(self.study), "",
            f"{self.reason()} in {self.wall_seconds:.0f} s ({self.trials_per_minute:.1f} finished trials/min); "
            f"MLflow parent run {self.parent_run_id} ({self.status})",
            f"browse the runs: {ui}",
        ])

    def reason(self) -> str:
        spec, tally = self.job.spec, self.tally
        if tally.finished >= spec.target_trials():
            return f"reached its target of {spec.target_trials()} finished trials"
        if tally.failed >= spec.max_failed_trials:
            return f"stopped after {tally.failed} failed trials (max_failed_trials = {spec.max_failed_trials})"
        return f"timed out with {tally.finished} of {spec.target_trials()} trials finished"


def run_study(job: StudyJob) -> StudyOutcome:
    """Runs (or resumes) a study with ``job.workers`` local workers, then logs its outcome to the parent run.
    A study that stops on ``max_failed_trials`` ends FAILED; Ctrl-C ends it KILLED and re-raises."""
    started = time.perf_counter()
    storage = open_storage(job)
    study = load_study(job, storage)
    finished_before = Tally.of(study.get_trials(deepcopy=False)).finished
    store = Store(job.tracking_uri)
    parent_run_id = _open_parent_run(study, job, store)
    with store.lifecycle(parent_run_id) as outcome:
        try:
            _run_workers(job)
            tally = Tally.of(study.get_trials(deepcopy=False))
            if tally.failed >= job.spec.max_failed_trials and tally.finished < job.spec.target_trials():
                outcome.status = "FAILED"
        finally:
            log_study_outcome(study, job, store, parent_run_id)
    return StudyOutcome(study, job, parent_run_id, outcome.status, tally, finished_before,
                        time.perf_counter() - started)


STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3,
               TrialState.FAIL: 4}


def _rank_key(study: optuna.Study, trial: FrozenTrial) -> tuple[int, float]:
    """Best first: COMPLETE by the first objective, then PRUNED by their last reported value, then the rest."""
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    if trial.values:
        value = trial.values[0]
    elif trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        value = math.inf * -sign
    return STATE_ORDER[trial.state], sign * value


def metric_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"value_{index}" for index in range(len(study.directions))]


def trials_table(study: optuna.Study, limit: int | None = None) -> pd.DataFrame:
    """The comparison table, best trial first: state, objective values, parameters, epochs, seconds, error."""
    names = metric_names(study)
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: _rank_key(study, t))[:limit or None]:
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update(zip(names, trial.values or [None] * len(names)))
        row.update(trial.params)
        row["epochs"] = trial.user_attrs.get("epochs_run", len(trial.intermediate_values))
        row["seconds"] = trial.duration.total_seconds() if trial.duration else None
        row["error"] = trial.user_attrs.get(ERROR_ATTR, "")
        rows.append(row)
    return pd.DataFrame(rows)


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Each parameter's importance for the first objective, by Optuna's default evaluator; empty while the
    study has too few COMPLETE trials to tell."""
    target = (lambda trial: trial.values[0]) if len(study.directions) > 1 else None
    try:
        with _quiet():
            return optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        log.warning(f"parameter importances unavailable: {exc}")
        return {}


def bookkeeping_share(study: optuna.Study) -> float | None:
    """Time spent outside the engine (Optuna + MLflow) as a share of the finished trials' durations."""
    timed = [trial for trial in study.get_trials(deepcopy=False, states=FINISHED)
             if "engine_seconds" in trial.user_attrs and trial.duration]
    total = sum(trial.duration.total_seconds() for trial in timed)
    return 1 - sum(trial.user_attrs["engine_seconds"] for trial in timed) / total if total else None


def describe_study(study: optuna.Study, limit: int = 10) -> str:
    """Counts, the best trial, the bookkeeping share and the comparison table (markdown)."""
    from .report import export_table

    tally = Tally.of(study.get_trials(deepcopy=False))
    lines = [f"study {study.study_name}: {tally.finished} finished trials, {tally.failed} failed, "
             f"{tally.running} running"]
    best = best_trial(study)
    if best is not None:
        values = ", ".join(f"{name} {value:.4f}" for name, value in zip(metric_names(study), best.values))
        lines.append(f"best trial #{best.number}: {values}; {best.params}")
    share = bookkeeping_share(study)
    if share is not None:
        lines.append(f"bookkeeping (Optuna + MLflow): {100 * share:.1f}% of trial time")
    table = trials_table(study, limit)
    if not table.empty:
        lines += ["", export_table(table, "md")]
    left_out = len(study.get_trials(deepcopy=False)) - len(table)
    if left_out > 0:
        lines.append(f"... and {left_out} more trial(s) not shown (--limit 0 shows all)")
    return "\n".join(lines)


def describe_importances(study: optuna.Study) -> str:
    importances = param_importances(study)
    if not importances:
        return "parameter importance: not enough COMPLETE trials yet"
    width = max(len(name) for name in importances)
    rows = [f"  {name:<{width}}  {value:.3f}" for name, value in importances.items()]
    return "\n".join([f"parameter importance for {metric_names(study)[0]}:", *rows])


def export_trials(study: optuna.Study, fmt: str) -> str:
    """Every trial in one of the report formats (md, csv, html, ...): number, state, objective values,
    parameters (``params_*``), start and end times (ISO 8601), duration in seconds and the trial's own
    attributes (``user_attrs_*``); Optuna's internal ``system_attrs`` are left out."""
    from .report import export_table

    table = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                          "duration", "params", "user_attrs"))
    if "duration" in table:
        table.insert(table.columns.get_loc("duration"), "duration_seconds", table.pop("duration").dt.total_seconds())
    for column in ("datetime_start", "datetime_complete"):
        if column in table:
            table[column] = table[column].map(lambda value: None if pd.isna(value) else value.isoformat())
    return export_table(table, fmt, title=f"study {study.study_name}: trials")
