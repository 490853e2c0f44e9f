"""A study's shared storage: opening it (``opening``) with heartbeats (``heartbeat``) and a handler for the trials
whose heartbeats stop, marked FAIL and queued again (``stale``); every call through the one retry policy
(``policy``, ``retrying``); the heartbeat interval kept with the study; the one lock per storage (``locks``); and
the keys the study and its trials carry there (``keys``). How workers use all this is told in the docstring of
``coordination``.

**Connections.** A process holds no database connection between its storage calls (no pool), and its calls,
the heartbeat thread's included, take turns: a worker uses one connection at a time, plus the reservation lock's
for the milliseconds it is held, and waiting for that lock costs none (``job.worker_connections``). So workers
fit a PostgreSQL role's or database's ``CONNECTION LIMIT``: when every connection is taken, "too many
connections" is a transient fault, waited out under the retry policy."""

from .heartbeat import _heartbeat
from .keys import (ERROR_ATTR, FAILURE_ATTR, GRACE_HEARTBEATS, HEARTBEAT_ATTR, INFRASTRUCTURE, MAX_RETRIES,
                   PARENT_RUN_ATTR, RETRY_HISTORY, RUN_ID_ATTR, SEED_CLAIM_ATTR, WORKER_ATTR)
from .locks import storage_lock
from .opening import (_quiet, adopt_heartbeat_interval, check_schema, default_studies, open_existing_study,
                      open_storage, reader, stored_study_names)
from .policy import STORAGE_RETRY, storage_policy
from .retrying import RetryingStorage
from .stale import StaleTrialHandler, retry_trial

__all__ = [
    "ERROR_ATTR", "FAILURE_ATTR", "GRACE_HEARTBEATS", "HEARTBEAT_ATTR", "INFRASTRUCTURE", "MAX_RETRIES",
    "PARENT_RUN_ATTR", "RETRY_HISTORY", "RUN_ID_ATTR", "SEED_CLAIM_ATTR", "STORAGE_RETRY", "RetryingStorage",
    "StaleTrialHandler", "WORKER_ATTR", "_heartbeat", "_quiet", "adopt_heartbeat_interval", "check_schema",
    "default_studies", "open_existing_study", "open_storage", "reader", "retry_trial", "storage_lock",
    "storage_policy", "stored_study_names",
]
