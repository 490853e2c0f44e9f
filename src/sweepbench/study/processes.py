"""A study's local worker processes: spawned, each given a fair share of the cores.

**Workers die with their parent**: a local worker whose ``study run`` process is gone (SIGKILL) stops its trial
as Ctrl-C would (FAIL, queued again) within a second, instead of running trials on its own."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

import optuna
import torch

from .. import engine
from ..retry import PermanentError, ServiceUnavailable
from .coordination import run_worker
from .job import StudyJob

PARENT_CHECK_SECONDS = 1.0
INTERRUPT_GRACE_SECONDS = 3


def configure_logging() -> None:
    """One line per trial (and per service outage) from sweepbench; Optuna's chatter only when it is a warning.
    Not passed on to the root logger, which ``mlflow.pytorch`` gives a handler of its own (``basicConfig``) that
    would print every line twice."""
    log = logging.getLogger("sweepbench")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _worker_process(job: StudyJob, worker_index: int, parent_pid: int) -> None:
    """Entry point of a spawned local worker: a fair share of the CPU threads, a watch on its parent, then the
    worker loop. A storage that stays unreachable ends the worker with one line and exit status 1."""
    configure_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    try:
        with engine.sigterm_interrupts():
            _watch_parent(parent_pid)
            run_worker(job, worker_index)
    except engine.Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except (ServiceUnavailable, PermanentError) as exc:
        logging.getLogger(__name__).error(f"worker {worker_index} stops: {exc}")
        sys.exit(1)


def _watch_parent(parent_pid: int) -> None:
    """Sends this worker SIGTERM (handled like Ctrl-C) once its parent is gone: an orphan is re-parented, so
    its parent pid changes."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        logging.getLogger(__name__).warning(f"worker {os.getpid()}: its study run process {parent_pid} is gone; "
                                            "stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class WorkersFailed(RuntimeError):
    """A local worker process ended with an error (its own line says which)."""


def _run_workers(job: StudyJob) -> None:
    if job.workers == 1:
        run_worker(job)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process, args=(job, index, os.getpid()),
                                 name=f"sweepbench-worker-{index}") for index in range(job.workers)]
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
        raise WorkersFailed(f"worker process(es) exited abnormally (exit status): {crashed}; see their lines above")


def _stop_workers(processes: list[multiprocessing.process.BaseProcess], signum: int) -> None:
    """After Ctrl-C or SIGTERM: a terminal's Ctrl-C (or a scheduler's SIGTERM to the process group) reaches every
    worker, which marks its trial and stops; a signal sent to this process alone is passed on to the workers
    still running after a grace period, at once if a second one comes. Returns when every worker has ended."""
    deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
    try:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signum)
    while any(process.is_alive() for process in processes):
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            continue
