"""Every call to a study's storage through the one retry policy (``sweepbench.retry``), one call at a time per
process."""

from __future__ import annotations

import threading
from typing import Sequence

from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat

from ...retry import RetryPolicy
from .policy import STORAGE_RETRY


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's RDB storage (or its gRPC proxy) with every call under the retry policy: a database that restarts
    for a moment costs a pause, not a trial (``trial.report`` writes every epoch). The calls of one process, the
    heartbeat thread's too, take turns (``turn``), so that the process uses one connection at a time. Heartbeats
    are the storage's own, or ``heartbeat``'s for a storage that keeps none (the gRPC proxy)."""

    def __init__(self, storage: BaseStorage, policy: RetryPolicy = STORAGE_RETRY,
                 heartbeat: BaseHeartbeat | None = None) -> None:
        self.raw, self.policy = storage, policy
        self.heartbeat = heartbeat or storage
        self.turn = threading.RLock()

    def one_try(self, name: str, *args, **kwargs):
        """One call of the storage's (or its heartbeat's) method ``name``, in this process's turn."""
        target = self.heartbeat if name in HEARTBEAT_METHODS else self.raw
        with self.turn:
            return getattr(target, name)(*args, **kwargs)

    def beat(self, trial_ids: Sequence[int]) -> None:
        """One try at recording the trials' heartbeats: the heartbeat thread skips a beat rather than wait."""
        for trial_id in trial_ids:
            self.one_try("record_heartbeat", trial_id)


HEARTBEAT_METHODS = frozenset({*BaseHeartbeat.__abstractmethods__, "get_failed_trial_callback"})


def _retried(name: str):
    def method(self: RetryingStorage, *args, **kwargs):
        return self.policy.call(self.one_try, name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in (*BaseStorage.__abstractmethods__, *BaseHeartbeat.__abstractmethods__, "get_trial_id_from_study_id_"
              "trial_number", "get_trial_number_from_id", "get_best_trial", "get_n_trials", "get_trial_param",
              "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "check_trial_is_updatable",
              "remove_session", "get_failed_trial_callback"):
    setattr(RetryingStorage, _name, _retried(_name))
RetryingStorage.__abstractmethods__ = frozenset()

