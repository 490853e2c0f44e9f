"""A worker's heartbeats: a thread that records them for the trials it holds, every interval; and heartbeats for
a storage that keeps none (Optuna's gRPC proxy), kept as trial attributes and judged by each worker's own clock.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from ...retry import is_transient
from .keys import HEARTBEAT_RETRY_SECONDS
from .retrying import RetryingStorage

BEAT_ATTR = "sweepbench.heartbeat"  # a trial's system attr: changes with every heartbeat of its worker


class ProgressHeartbeat(BaseHeartbeat):
    """Heartbeats over a storage without them (Optuna's ``GrpcStorageProxy``). A worker's beat writes a new value
    to its trial's ``BEAT_ATTR``; a trial is stale once this process has seen the same value for longer than
    ``grace`` seconds by its own monotonic clock. No two machines' clocks are compared, so a worker whose clock
    is off fails no one. A process starts with no history: it fails a trial only after watching it for the
    grace period. Failing a stale trial is Optuna's ``fail_stale_trials``: the RUNNING -> FAIL update succeeds
    for one worker only, which queues the trial again (``stale.StaleTrialHandler``)."""

    def __init__(self, storage: BaseStorage, interval: int, grace: float,
                 callback: Callable[[optuna.Study, FrozenTrial], None]) -> None:
        self.storage, self.interval, self.grace, self.callback = storage, interval, grace, callback
        self.beats = itertools.count(1)
        self.worker = f"{platform.node()}:{os.getpid()}"
        self.seen: dict[int, tuple[Any, float]] = {}  # trial id -> (last value seen, since when, monotonic)

    def record_heartbeat(self, trial_id: int) -> None:
        """A new value on the trial; nothing once it has ended (another worker failed it as stale, say)."""
        try:
            self.storage.set_trial_system_attr(trial_id, BEAT_ATTR, f"{self.worker}:{next(self.beats)}")
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.monotonic()
        running = self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        seen: dict[int, tuple[Any, float]] = {}
        for trial in running:
            value = trial.system_attrs.get(BEAT_ATTR)
            last = self.seen.get(trial._trial_id)
            seen[trial._trial_id] = last if last is not None and last[0] == value else (value, now)
        self.seen = seen
        return [trial_id for trial_id, (_, since) in seen.items() if now - since > self.grace]

    def get_heartbeat_interval(self) -> int:
        return self.interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self.callback


@contextlib.contextmanager
def _heartbeat(storage: RetryingStorage, trial_ids: Sequence[int], interval: int) -> Iterator[None]:
    """Records the trials' heartbeats every ``interval`` seconds, as ``Study.optimize`` does; ``trial_ids`` may
    grow meanwhile (a worker reserves its trials one by one, and the first must not go stale while the sampler
    makes the others). A database that is busy or down for a moment costs beats, not the thread (a silent thread
    would make a live trial look dead). A permanent error ends the beats quietly: the trial's own next call ends
    the worker, in one line."""
    stop = threading.Event()

    def beat() -> None:
        wait = interval
        while not stop.wait(wait):
            try:
                storage.beat(list(trial_ids))
                wait = interval
            except Exception as exc:
                if storage.policy.permanent(exc) is not None:
                    return
                if not is_transient(exc):
                    raise
                wait = min(interval, HEARTBEAT_RETRY_SECONDS)  # beat again as soon as the storage is back

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
