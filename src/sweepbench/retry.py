"""The one retry policy for calls to the services a run depends on (the study's storage, the MLflow tracking
store): a transient fault (a refused or dropped connection, a database restarting, a busy SQLite file, a
tracking server answering 5xx) is retried with exponential backoff for up to ``SWEEPBENCH_RETRY_SECONDS``
(default 120) per call, logged in one line when an incident starts and one when the service is back. A fault that
outlasts the budget is raised as ``ServiceUnavailable``, one line naming the service and the last error, which
callers tell apart from a failure of the trial itself. A permanent fault, one that waiting cannot cure (a read-only
file or file system, a permission denied, a user or password the server refuses), is raised at once as
``PermanentError``, never retried and never taken for an outage. Any other error is raised at once as it is.
Ctrl-C and SIGTERM wait for the end of a call (``engine.interrupts.uninterrupted``), never cutting one in half."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import re
import sys
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


class PermanentError(RuntimeError):
    """A service refused a call for a reason that waiting will not cure: not an outage (``ServiceUnavailable``,
    which a study waits out and retries its trial for), so the command ends at once, in one line."""


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
# Optuna's gRPC storage proxy: the proxy unreachable or busy, or its database's transient fault, which the proxy
# passes on as UNKNOWN with the driver's error in the details
TRANSIENT_GRPC_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}


PERSISTENT_TEXTS = ("disk is full", "No space left")  # SQLite's SQLITE_FULL, ENOSPC: waiting will not help
PERMANENT_TEXTS = re.compile(
    "attempt to write a readonly database"  # SQLite's SQLITE_READONLY: a read-only file or file system
    "|Read-only file system|Permission denied|permission denied"  # EROFS, EACCES; PostgreSQL's privileges
    "|password authentication failed|no pg_hba.conf entry|role \".*\" does not exist")  # PostgreSQL's login
PERMANENT_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def permanent_reason(exc: BaseException) -> str | None:
    """The error in ``exc``'s chain that makes it permanent (read-only, permission, authentication), described
    in one line, or None. "too many connections" is not one of them: connections free up."""
    for error in causes(exc):
        if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS or PERMANENT_TEXTS.search(str(error)):
            return describe(error)
    return None


def detach(error: BaseException, handled: BaseException) -> None:
    """Cuts the implicit link from ``error``'s chain to ``handled``, the error that was being handled when the
    call that raised ``error`` began: it did not cause ``error``, so it must not make ``error`` permanent or
    transient (a lookup that fails while a study ends on a read-only storage is not read-only itself)."""
    for cause in causes(error):
        if cause.__context__ is handled:
            cause.__context__ = None


def transient_cause(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that makes it a service's transient fault (the driver's, not the wrapper's
    Optuna raises), or None for a mistake in the request, a full disk or a permanent fault. Checked by name, so
    this module imports neither SQLAlchemy, requests nor MLflow."""
    if any(text in str(error) for error in causes(exc) for text in PERSISTENT_TEXTS) or permanent_reason(exc):
        return None
    for error in causes(exc):
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & TRANSIENT_NAMES:
            return error
        if "MlflowException" in names and any(code in str(error)[:300] for code in TRANSIENT_HTTP):
            return error
        if "RpcError" in names and transient_rpc(error):
            return error
    return None


def transient_rpc(error: BaseException) -> bool:
    """A gRPC call's error that waiting may cure: by its status code, or a database fault behind the proxy."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    name = getattr(code(), "name", "") if callable(code) else ""
    text = details() or "" if callable(details) else ""
    return name in TRANSIENT_GRPC_CODES or name == "UNKNOWN" and any(cause in text for cause in TRANSIENT_NAMES)


def is_transient(exc: BaseException) -> bool:
    return transient_cause(exc) is not None


def describe(exc: BaseException) -> str:
    """One line: the error's type and text, without SQLAlchemy's link to its background page and psycopg's
    ``connection to server ... failed: FATAL:`` preamble."""
    text = str(exc).split("(Background on this error at:")[0].rsplit("failed: FATAL:", 1)[-1]
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):  # a gRPC call's error
        text = f"{getattr(exc.code(), 'name', exc.code())} {exc.details() or ''}"
    return f"{type(exc).__name__}: {' '.join(text.split())[:200]}"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries ``call``s to ``service`` on transient faults for ``budget`` seconds (``retry_budget()`` if None),
    waiting ``first_delay`` seconds, then twice as long each time up to ``max_delay``. ``diagnose`` may name, for
    an error, a problem of the service's own that makes it permanent (a SQLite file that cannot be written)."""

    service: str
    budget: float | None = None
    first_delay: float = 0.25
    max_delay: float = 8.0
    diagnose: Callable[[BaseException], str | None] | None = None

    def permanent(self, exc: BaseException) -> PermanentError | None:
        """``exc`` as a ``PermanentError`` if it is one (``permanent_reason`` or ``diagnose``), else None."""
        if isinstance(exc, PermanentError):
            return exc
        reason = (self.diagnose and self.diagnose(exc)) or permanent_reason(exc)
        if reason is None:
            return None
        return PermanentError(f"permanent {self.service} error (waiting will not help, so it is not retried): "
                              f"{reason}")

    def call(self, function: Callable[..., T], *args, **kwargs) -> T:
        seconds = retry_budget() if self.budget is None else self.budget
        started = time.monotonic()
        delay, attempts = self.first_delay, 0
        handled = sys.exc_info()[1]  # a call made in an ``except`` or ``finally`` block: the error handled there
        while True:
            try:
                with uninterrupted():
                    result = function(*args, **kwargs)
            except Exception as exc:
                if handled is not None:
                    detach(exc, handled)
                permanent = self.permanent(exc)
                if permanent is exc:
                    raise
                if permanent is not None:
                    raise permanent from exc
                cause = transient_cause(exc)
                if cause is None:
                    raise
                attempts += 1
                waited = time.monotonic() - started
                if waited + delay > seconds:
                    raise ServiceUnavailable(f"{self.service} unreachable for {waited:.0f} s ({attempts} tries): "
                                             f"{describe(cause)}") from exc
                if attempts == 1 and self.service not in _DOWN_SINCE:
                    _DOWN_SINCE[self.service] = started
                    log.warning(f"{self.service} unreachable ({describe(cause)}); retrying each call for up to "
                                f"{seconds:.0f} s")
                time.sleep(delay)
                delay = min(2 * delay, self.max_delay)
                continue
            down_since = _DOWN_SINCE.pop(self.service, None)
            if down_since is not None:
                log.warning(f"{self.service} back after {time.monotonic() - down_since:.1f} s")
            return result
