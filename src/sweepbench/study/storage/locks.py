"""The one lock per storage, held for milliseconds: a file lock beside a SQLite file, a PostgreSQL advisory lock,
and for Optuna's gRPC proxy a lock made of a study that only one process can create (``study_mutex``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Iterator

import filelock
import optuna
import sqlalchemy
from optuna.study import StudyDirection

from ...retry import is_transient
from ..job import STUDIES_DIR
from .policy import STORAGE_RETRY, storage_policy
from .proxy import grpc_proxy, is_proxy

log = logging.getLogger(__name__)


ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sweepbench.study").digest()[:8], "big", signed=True)
LOCK_FIRST_WAIT, LOCK_LONGEST_WAIT = 0.02, 0.25  # seconds between tries for a lock another process holds


class Lease:
    """A held storage lock. ``held()`` says whether it still is, for a holder that must not act on a lock it
    lost; ``renew()`` tells waiters that its holder is alive. A file lock cannot be lost while its process lives."""

    def held(self) -> bool:
        return True

    def renew(self) -> None:
        """Nothing to renew for a lock that has no lease."""


class AdvisoryLease(Lease):
    """A PostgreSQL advisory lock, lost with its connection (a server restart, a dropped connection)."""

    def __init__(self, connection: sqlalchemy.engine.Connection) -> None:
        self.connection = connection

    def held(self) -> bool:
        if self.connection.invalidated:
            return False
        try:
            self.connection.execute(sqlalchemy.text("SELECT 1"))
        except sqlalchemy.exc.SQLAlchemyError:
            return False
        return True


@contextlib.contextmanager
def storage_lock(storage_url: str) -> Iterator[Lease]:
    """One lock per storage, held for milliseconds: around creating its tables (two workers starting on an empty
    database would both create them) and around each trial reservation (see the docstring of ``coordination``)."""
    if is_proxy(storage_url):
        with study_mutex(storage_url) as lease:
            yield lease
        return
    url = sqlalchemy.engine.make_url(storage_url)
    if url.get_backend_name() == "postgresql":
        connection = _advisory_lock(storage_url)
        try:
            yield AdvisoryLease(connection)
        finally:
            _advisory_unlock(connection)
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    path = Path(f"{database}.lock") if database else Path.cwd() / STUDIES_DIR / "storage.lock"
    lock = filelock.FileLock(str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:  # a read-only file system, say: the lock file cannot be opened for writing
        permanent = storage_policy(storage_url).permanent(exc)
        if permanent is None:
            raise
        raise permanent from exc
    try:
        yield Lease()
    finally:
        lock.release()


MUTEX_STUDY = "sweepbench.reservation-lock"  # lives in the proxy's database for the milliseconds it is held
MUTEX_TOKEN_ATTR = "holder"
MUTEX_LEASE_SECONDS = 60.0


class MutexLease(Lease):
    """The proxy's lock as this process holds it: the lock study's id and this holder's token, written with a
    count that ``renew`` raises (``token:count``), so that waiters see the holder alive and restart their clocks."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int, token: str) -> None:
        self.storage, self.study_id, self.token = storage, study_id, token
        self.renewals = 0

    def held(self) -> bool:
        holder = _holder(self.storage)
        return holder is not None and holder[0] == self.study_id and _owner(holder[1]) == self.token

    def renew(self) -> None:
        """A new count on the lock study; nothing when a waiter took the lock already (``held()`` then says so)."""
        self.renewals += 1
        with contextlib.suppress(KeyError):
            STORAGE_RETRY.call(self.storage.set_study_user_attr, self.study_id, MUTEX_TOKEN_ATTR,
                               f"{self.token}:{self.renewals}")

    def release(self) -> None:
        """Deletes the lock study if it is still this holder's; one line if a waiter took it meanwhile."""
        if not self.held():
            log.warning("the storage lock was taken from this process while it held it (stalled for longer than "
                        f"{MUTEX_LEASE_SECONDS:.0f} s)")
            return
        with contextlib.suppress(KeyError):
            STORAGE_RETRY.call(self.storage.delete_study, self.study_id)


@contextlib.contextmanager
def study_mutex(storage_url: str) -> Iterator[MutexLease]:
    """The gRPC proxy's lock: Optuna's storage API has no lock, but creating a study is atomic (a second one of
    the same name fails with ``DuplicatedStudyError``), so holding the lock is having created the study
    ``MUTEX_STUDY``, and releasing it is deleting it. A holder that dies (or is cut off) leaves the study behind:
    a waiter that has seen the same holder (study id and token, with its renewal count) for
    ``MUTEX_LEASE_SECONDS`` by its own clock deletes it and takes its turn. A holder stalled that long may so lose
    the lock it holds: ``held()`` tells, and it deletes only a lock that is still its own. A process interrupted
    between creating the lock study and knowing it did leaves it to the lease."""
    storage = grpc_proxy(storage_url)
    lease = _acquire(storage, uuid.uuid4().hex)
    try:
        yield lease
    finally:
        lease.release()


def _acquire(storage: optuna.storages.BaseStorage, token: str) -> MutexLease:
    wait, watched = LOCK_FIRST_WAIT, None  # watched: (the holder this process waits on, since when)
    while True:
        try:
            study_id = STORAGE_RETRY.call(storage.create_new_study, [StudyDirection.MINIMIZE], MUTEX_STUDY)
        except optuna.exceptions.DuplicatedStudyError:
            holder, now = _holder(storage), time.monotonic()
            if watched is None or watched[0] != holder:
                watched = (holder, now)
            elif holder is not None and now - watched[1] > MUTEX_LEASE_SECONDS:
                _evict(storage, holder)
                watched = None
                continue
            time.sleep(random.uniform(0.5, 1.5) * wait)
            wait = min(2 * wait, LOCK_LONGEST_WAIT)
            continue
        lease = MutexLease(storage, study_id, token)
        try:
            STORAGE_RETRY.call(storage.set_study_user_attr, study_id, MUTEX_TOKEN_ATTR, token)
        except KeyError:
            continue  # taken from this process already: a stall of over the lease between two calls
        except BaseException:  # Ctrl-C, say: the lock study is this process's, and no one else's to delete
            with contextlib.suppress(Exception):
                STORAGE_RETRY.call(storage.delete_study, study_id)
            raise
        return lease


def _evict(storage: optuna.storages.BaseStorage, holder: tuple[int, str | None]) -> None:
    """Deletes a lock whose holder has not changed or renewed it for the lease, if it is still that holder's."""
    log.warning(f"the storage lock's holder has held it for over {MUTEX_LEASE_SECONDS:.0f} s without renewing it "
                "(its process is gone or cut off): taking it")
    if _holder(storage) == holder:
        with contextlib.suppress(KeyError):
            STORAGE_RETRY.call(storage.delete_study, holder[0])


def _holder(storage: optuna.storages.BaseStorage) -> tuple[int, str | None] | None:
    """The lock study's id and its holder's token (with its renewal count), or None when nobody holds the lock."""
    try:
        study_id = STORAGE_RETRY.call(storage.get_study_id_from_name, MUTEX_STUDY)
        return study_id, STORAGE_RETRY.call(storage.get_study_user_attrs, study_id).get(MUTEX_TOKEN_ATTR)
    except KeyError:
        return None


def _owner(value: str | None) -> str | None:
    """The token in a holder's ``token:count``."""
    return None if value is None else value.split(":", 1)[0]


@functools.lru_cache(maxsize=4)
def _lock_engine(storage_url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)


def _advisory_lock(storage_url: str) -> sqlalchemy.engine.Connection:
    """A connection holding the storage's advisory lock, a session lock: it lasts as long as the connection.
    Taken with ``pg_try_advisory_lock``, each try on a new connection that is closed again while another process
    holds the lock: waiting costs no connection, which the holder may need under a ``CONNECTION LIMIT``. Each try
    is under the retry policy (a server that is down is waited for within its budget); waiting for the holder
    has no limit, as ``pg_advisory_lock``'s has none."""
    wait = LOCK_FIRST_WAIT
    while True:
        connection = STORAGE_RETRY.call(_try_advisory_lock, storage_url)
        if connection is not None:
            return connection
        time.sleep(random.uniform(0.5, 1.5) * wait)  # jitter: waiting workers do not try in step
        wait = min(2 * wait, LOCK_LONGEST_WAIT)


def _try_advisory_lock(storage_url: str) -> sqlalchemy.engine.Connection | None:
    """A connection holding the advisory lock, or None (and no connection) while another session holds it."""
    connection = _lock_engine(storage_url).connect()
    try:
        taken = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"),
                                   {"key": ADVISORY_LOCK_KEY}).scalar()
    except BaseException:
        connection.close()
        raise
    if not taken:
        connection.close()
        return None
    return connection


def _advisory_unlock(connection: sqlalchemy.engine.Connection) -> None:
    """Releases the advisory lock. A connection the server dropped meanwhile (a restart) has nothing to release:
    its session, and the lock with it, ended on the server."""
    try:
        if not connection.invalidated:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
    except Exception as exc:
        if not is_transient(exc):
            raise
    finally:
        connection.close()

