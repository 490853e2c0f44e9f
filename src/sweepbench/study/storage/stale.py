"""Trials that did not end on their own: queued again with the same parameters, and the handler for trials whose
heartbeats stopped."""

from __future__ import annotations

import logging

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...retry import ServiceUnavailable
from ...tracking import Store
from .keys import MAX_RETRIES, RETRY_HISTORY, RUN_ID_ATTR

log = logging.getLogger(__name__)


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retries: int | None = MAX_RETRIES) -> bool:
    """Queues a trial that did not end on its own (dead worker, Ctrl-C) to run again with the same parameters,
    at most ``max_retries`` times (None: always, for failures of the infrastructure). Optuna's own retry
    callback copies the user attributes too (the old MLflow run id, the error); this one keeps only the
    parameters and the retry history."""
    history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
    if max_retries is not None and len(history) > max_retries:
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
            try:
                Store(self.tracking_uri).fail_run(run_id, "its worker stopped sending heartbeats (killed?)")
            except ServiceUnavailable:
                pass  # left RUNNING: the next ``study run`` reconciles it with the trial's state
        retried = retry_trial(study, trial)
        log.warning(f"trial {trial.number}: its worker stopped sending heartbeats; marked FAIL"
                    + (", queued again" if retried else f", not retried ({MAX_RETRIES} retries used)"))

