"""The one retry policy for calls to the services a run depends on (the study's storage, the MLflow tracking
store): a transient fault (a refused or dropped connection, a database restarting, a busy SQLite file, a
tracking server answering 5xx) is retried with exponential backoff for up to ``SWEEPBENCH_RETRY_SECONDS``
(default 120) per call, logged in one line when an incident starts and one when the service is back. Any other error
is raised at once; a fault that outlasts the budget is raised as ``ServiceUnavailable``, one line naming the
service and the last error, which callers tell apart from a failure of the trial itself. Ctrl-C and SIGTERM wait
for the end of a call (``engine.interrupts.uninterrupted``), never cutting one in half."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from .engine.interrupts import uninterrupted

log = logging.getLogger("sweepbench.retry")

RETRY_SECONDS_ENV = "SWEEPBENCH_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
T = TypeVar("T")
_DOWN_SINCE: dict[str, float] = {}  # service -> when this process first found it down: one line per incident


class ServiceUnavailable(RuntimeError):
    """A service stayed unreachable for the whole retry budget: a fault of the infrastructure, not of a run."""


_BUDGET_OVERRIDE: contextvars.ContextVar[float | None] = contextvars.ContextVar("retry_budget", default=None)


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Retries within the block wait at most ``seconds`` (0: one try): for a caller that has a fallback, such
    as a logger that keeps its records for later."""
    token = _BUDGET_OVERRIDE.set(seconds)
    try:
        yield
    finally:
        _BUDGET_OVERRIDE.reset(token)


def retry_budget() -> float:
    override = _BUDGET_OVERRIDE.get()
    if override is not None:
        return override
    text = os.environ.get(RETRY_SECONDS_ENV)
    try:
        return max(0.0, float(text)) if text else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling, each once (Optuna and MLflow wrap
    the driver's error)."""
    seen, pending = [], [error]
    while pending:
        cause = pending.pop()
        if cause is not None and all(cause is not known for known in seen):
            seen.append(cause)
            pending += [cause.__cause__, cause.__context__]
    return seen


TRANSIENT_NAMES = {
    "OperationalError",  # sqlalchemy / DB-API: connection refused or lost, server restarting, database is locked
    "InterfaceError",  # psycopg2: connection already closed
    "DisconnectionError",
    "ConnectionError",  # requests, and the built-in (ConnectionRefusedError, BrokenPipeError are subclasses)
    "ConnectTimeout",
    "ReadTimeout",
    "MaxRetryError",  # urllib3, under MLflow's own HTTP retries
    "ProtocolError",
}
TRANSIENT_HTTP = ("500", "502", "503", "504", "TEMPORARILY_UNAVAILABLE", "failed with exception")


PERSISTENT_TEXTS = ("disk is full", "No space left")  # SQLite's SQLITE_FULL, ENOSPC: waiting will not help


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a service's transient fault rather than a mistake in the request or a full disk.
    Checked by name, so this module imports neither SQLAlchemy, requests nor MLflow."""
    if any(text in str(error) for error in causes(exc) for text in PERSISTENT_TEXTS):
        return False
    for error in causes(exc):
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & TRANSIENT_NAMES:
            return True
        if "MlflowException" in names and any(code in str(error)[:300] for code in TRANSIENT_HTTP):
            return True
    return False


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries ``call``s to ``service`` on transient faults for ``budget`` seconds (``retry_budget()`` if None),
    waiting ``first_delay`` seconds, then twice as long each time up to ``max_delay``."""

    service: str
    budget: float | None = None
    first_delay: float = 0.25
    max_delay: float = 8.0

    def call(self, function: Callable[..., T], *args, **kwargs) -> T:
        seconds = retry_budget() if self.budget is None else self.budget
        started = time.monotonic()
        delay, attempts = self.first_delay, 0
        while True:
            try:
                with uninterrupted():
                    result = function(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                attempts += 1
                waited = time.monotonic() - started
                if waited + delay > seconds:
                    raise ServiceUnavailable(f"{self.service} unreachable for {waited:.0f} s ({attempts} tries): "
                                             f"{describe(exc)}") from exc
                if attempts == 1 and self.service not in _DOWN_SINCE:
                    _DOWN_SINCE[self.service] = started
                    log.warning(f"{self.service} unreachable ({describe(exc)}); retrying each call for up to "
                                f"{seconds:.0f} s")
                time.sleep(delay)
                delay = min(2 * delay, self.max_delay)
                continue
            down_since = _DOWN_SINCE.pop(self.service, None)
            if down_since is not None:
                log.warning(f"{self.service} back after {time.monotonic() - down_since:.1f} s")
            return result
