"""The keys a study and its trials carry in the storage, and the numbers of its heartbeat and retry policy."""

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
WORKER_ATTR = "worker"
SEED_CLAIM_ATTR = "sampler_seed_claim"  # study user attrs "sampler_seed_claim.<trials>.<worker index>": host:pid
RETRY_HISTORY = "retry_history"
HEARTBEAT_ATTR = "heartbeat_interval"  # the first worker's interval, which every later worker uses
FAILURE_ATTR = "failure"  # "infrastructure" on a trial that failed for want of its storage or tracking store
INFRASTRUCTURE = "infrastructure"
GRACE_HEARTBEATS = 3
HEARTBEAT_RETRY_SECONDS = 0.5
MAX_RETRIES = 2
