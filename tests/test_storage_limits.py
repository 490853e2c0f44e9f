"""Storage errors that waiting will not cure, and a PostgreSQL connection limit, on real services: a SQLite study
file on a tmpfs the test remounts read-only (before and during a study), a PostgreSQL role that does not exist,
and roles and databases with a CONNECTION LIMIT (the roles are not superusers, whom limits do not bind). A
permanent error is one line at once, never retried; a limit too small for one worker is refused up front,
creating nothing; a study under a limit it fits waits for connections and finishes with exactly N."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import optuna
import pytest
import sqlalchemy

from sweepbench.retry import PermanentError, RetryPolicy
from sweepbench.study import WORKER_ATTR, make_job, normalize_storage_url, open_storage
from sweepbench.study.spec import load_spec
from sweepbench.study.storage import storage_lock
from tests.conftest import assert_refused, run_cli
from tests.test_faults_disk import tmpfs
from tests.test_study import assert_exactly, study_args, write_spec

TINY_SEARCH = """
[search."model_kwargs.hidden_size"]
type = "int"
low = 16
high = 32
"""
RETRY_SECONDS = 60  # each case below ends, or waits out its busy connections, in far less


def tiny_spec(directory: Path, name: str, n_trials: int) -> Path:
    """A study of 1-epoch MLPs 16-32 wide on 1,000 MNIST images: a second or two per trial."""
    return write_spec(directory, name, n_trials=n_trials, epochs=1, subset=1000, pruner="none", search=TINY_SEARCH)


def remount_read_only(disk: Path, timeout: float = 10) -> None:
    """Remounts ``disk`` read-only; the kernel refuses while a file on it is open for writing (a storage call in
    progress), so it is tried until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if remounted.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{disk} stayed busy for {timeout} s: {remounted.stderr.strip()}")
        time.sleep(0.02)


def finished_trials(database: Path) -> int:
    """COMPLETE trials in a SQLite study file (0 before it has its tables), read through a read-only handle,
    which leaves its disk free to be remounted read-only."""
    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        try:
            return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_a_read_only_sqlite_study_file_is_refused_up_front(tmp_path: Path, data_dir: Path) -> None:
    """An existing study on a file system that is read-only (for root too): exit 2, one line, nothing made."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    spec = tiny_spec(tmp_path, "frozen", n_trials=2)
    with tmpfs(tmp_path / "disk", "8m") as disk:
        storage = optuna.storages.RDBStorage(f"sqlite:///{disk}/frozen.db",
                                             engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
        optuna.create_study(storage=storage, study_name="frozen")
        before = (disk / "frozen.db").read_bytes()
        remount_read_only(disk)
        path = re.escape(str(disk / "frozen.db"))
        assert_refused(study_args(spec, data_dir, "--storage", f"sqlite:///{disk}/frozen.db"),
                       rf"--storage: sqlite:///{path} cannot be written \({path}: Read-only file system\); give a "
                       r"file you can write to$", cwd)
        assert sorted(path.name for path in disk.iterdir()) == ["frozen.db"]
        assert (disk / "frozen.db").read_bytes() == before


@pytest.mark.slow
def test_a_storage_that_goes_read_only_mid_study_ends_the_command_at_once_in_one_line(tmp_path: Path,
                                                                                     data_dir: Path) -> None:
    """The study file's file system is remounted read-only while trials run: the next write ends the command
    (exit 1: trials were done) with one line naming a permanent error, long before the retry budget is spent, and
    without a retry or a traceback."""
    spec = tiny_spec(tmp_path, "remounted", n_trials=500)
    with tmpfs(tmp_path / "disk", "16m") as disk:
        args = study_args(spec, data_dir, "--storage", f"sqlite:///{disk}/remounted.db")
        process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *args], cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "SWEEPBENCH_RETRY_SECONDS": str(RETRY_SECONDS)})
        try:
            deadline = time.monotonic() + 180
            while finished_trials(disk / "remounted.db") < 2:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()
                time.sleep(0.2)
            remount_read_only(disk)
            remounted = time.monotonic()
            _, stderr = process.communicate(timeout=RETRY_SECONDS * 2)
            ended = time.monotonic() - remounted
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = [line for line in stderr.splitlines() if line.startswith("sweepbench: error:")]
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and "unreachable" not in stderr, stderr
    assert errors == [stderr.splitlines()[-1]], stderr
    assert errors[0].startswith("sweepbench: error: permanent study storage error (waiting will not help, so it "
                                "is not retried): "), errors[0]
    assert "Read-only file system" in errors[0], errors[0]
    assert ended < RETRY_SECONDS / 4, f"ended {ended:.1f} s after the remount"


def test_a_call_made_while_a_permanent_error_is_handled_is_judged_by_its_own_errors() -> None:
    """A study ending on a read-only storage still looks its best model up in MLflow (a ``finally`` block): that
    call's errors are not read-only because the error being handled is, so a refused connection is retried and a
    missing model is raised as it is, not as the study's permanent error."""
    policy, attempts = RetryPolicy("MLflow tracking store", budget=5, first_delay=0.01), []

    def lookup() -> None:
        attempts.append(len(attempts))
        raise ConnectionRefusedError("refused") if len(attempts) == 1 else LookupError("no model named 'study'")

    try:
        raise PermanentError("permanent study storage error: study.db cannot be written (Read-only file system)")
    except PermanentError:
        with pytest.raises(LookupError, match="no model named"):
            policy.call(lookup)
    assert attempts == [0, 1]


@pytest.fixture
def limited_database(postgres_admin) -> Iterator[Callable[..., str]]:
    """Makes a login role (not a superuser) and a database it owns, with the CONNECTION LIMITs given (-1: none),
    and returns the storage URL; both are dropped afterwards, the role's connections ended first."""
    made: list[str] = []

    def make(role_limit: int = -1, database_limit: int = -1) -> str:
        name = f"sweepbench_limit_{uuid.uuid4().hex[:10]}"
        made.append(name)
        with postgres_admin.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT {role_limit}")
            cursor.execute(f"CREATE DATABASE {name} OWNER {name} CONNECTION LIMIT {database_limit}")
        return f"postgresql://{name}@127.0.0.1:5432/{name}"

    yield make
    with postgres_admin.cursor() as cursor:
        for name in made:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cursor.execute(f"DROP ROLE IF EXISTS {name}")


def idle_connections(postgres_admin, url: str, settle: float = 3) -> int:
    """The connections the URL's role holds once they settle: a closed connection's server process ends a moment
    after the client closes it, so a count above 0 is read again for up to ``settle`` seconds."""
    role = sqlalchemy.engine.make_url(url).username
    deadline = time.monotonic() + settle
    while True:
        with postgres_admin.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
            count = cursor.fetchone()[0]
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def tables_in(url: str) -> int:
    """Tables in the URL's database, counted as the superuser, who no limit stops."""
    admin_url = sqlalchemy.engine.make_url(normalize_storage_url(url)).set(username="postgres")
    engine = sqlalchemy.create_engine(admin_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")).scalar()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_postgresql_role_that_does_not_exist_is_one_line_at_once(postgres_admin, tmp_path: Path,
                                                                  data_dir: Path) -> None:
    role = f"sweepbench_nobody_{uuid.uuid4().hex[:8]}"
    spec = tiny_spec(tmp_path, "nobody", n_trials=2)
    started = time.monotonic()
    assert_refused(study_args(spec, data_dir, "--storage", f"postgresql://{role}@127.0.0.1/postgres"),
                   rf'--storage: postgresql://{role}@127\.0\.0\.1/postgres is refused by the server \(role "{role}" '
                   r"does not exist\), which retrying will not change; give a user, password and database", tmp_path,
                   env={"SWEEPBENCH_RETRY_SECONDS": str(RETRY_SECONDS)}, timeout=30)
    assert time.monotonic() - started < 30


@pytest.mark.postgres
def test_a_storage_that_refuses_its_user_mid_run_is_not_retried(postgres_admin, limited_database, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The role is dropped after the up-front check passed (as an administrator might): opening the storage
    raises ``PermanentError`` at once, not ``ServiceUnavailable`` after the retry budget."""
    url = limited_database()
    job = make_job(load_spec(tiny_spec(tmp_path, "dropped", n_trials=2)), storage_url=url,
                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    role = sqlalchemy.engine.make_url(url).username
    with postgres_admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE {role} WITH (FORCE)")
        cursor.execute(f"DROP ROLE {role}")
    monkeypatch.setenv("SWEEPBENCH_RETRY_SECONDS", str(RETRY_SECONDS))
    started = time.monotonic()
    with pytest.raises(PermanentError, match=rf'^permanent study storage error .*role "{role}" does not exist$'):
        open_storage(job)
    assert time.monotonic() - started < 5


def open_a_study(url: str, directory: Path) -> None:
    """Creates the storage's tables and a study in them, as a first ``study run`` would."""
    job = make_job(load_spec(tiny_spec(directory, "first", n_trials=2)), storage_url=url,
                   tracking_uri=f"sqlite:///{directory}/mlflow.db")
    optuna.create_study(storage=open_storage(job), study_name="first")


def set_limit(postgres_admin, kind: str, name: str, limit: int) -> None:
    with postgres_admin.cursor() as cursor:
        cursor.execute(f"ALTER {kind} {name} CONNECTION LIMIT {limit}")


@pytest.mark.postgres
@pytest.mark.parametrize("limited, limit, tables, needed", [
    ("role", 1, False, 3), ("database", 2, False, 3), ("role", 1, True, 2), ("database", 1, True, 2)])
def test_a_connection_limit_below_what_one_worker_needs_is_refused_up_front(
        postgres_admin, limited_database, tmp_path: Path, data_dir: Path, limited: str, limit: int, tables: bool,
        needed: int) -> None:
    """A worker needs 2 connections at once, and 3 while it creates the storage's tables (an empty database)."""
    url = limited_database()
    name = sqlalchemy.engine.make_url(url).username  # the role's and the database's
    if tables:
        open_a_study(url, tmp_path)
    set_limit(postgres_admin, limited.upper(), name, limit)
    before = tables_in(url)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    spec = tiny_spec(tmp_path, "cramped", n_trials=2)
    creates = "that creates the storage's tables " if needed == 3 else ""
    assert_refused(study_args(spec, data_dir, "--storage", url),
                   rf"--storage: {re.escape(url)} lets {limited} {name} open {limit} connection\(s\) at once \(its "
                   rf"CONNECTION LIMIT\), and a study worker {creates}\(.*\) needs {needed} at once; raise it to "
                   rf"{needed} or more, e\.g\. ALTER {limited.upper()} {name} CONNECTION LIMIT {needed}$", cwd,
                   timeout=30)
    assert tables_in(url) == before


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_process_holds_no_connection_between_storage_calls_and_none_while_it_waits_for_the_lock(
        postgres_admin, limited_database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a limit of 2 (on a database that has its tables): a process that holds the reservation lock (one
    connection) can still make storage calls (the other) while a second process waits for the lock. Waiting in
    ``pg_advisory_lock``, as before, held a connection, and the holder's calls failed with "too many connections"
    until the retry budget ran out (the limit's deadlock). Between calls, and after them, the process holds none."""
    url = normalize_storage_url(limited_database())
    open_a_study(url, tmp_path)
    set_limit(postgres_admin, "ROLE", sqlalchemy.engine.make_url(url).username, 2)
    job = make_job(load_spec(tiny_spec(tmp_path, "turns", n_trials=2)), storage_url=url,
                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SWEEPBENCH_RETRY_SECONDS", "5")
    study = optuna.create_study(storage=open_storage(job), study_name="turns")
    assert idle_connections(postgres_admin, url) == 0, "the storage keeps a connection open between calls"
    waited = threading.Event()

    def wait_for_the_lock() -> None:
        with storage_lock(url):
            waited.set()

    with storage_lock(url):
        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        for _ in range(10):
            study.enqueue_trial({})
            study.ask()
        assert not waited.is_set()
    waiter.join(timeout=30)
    assert waited.is_set()
    assert len(study.get_trials(deepcopy=False)) == 10
    assert idle_connections(postgres_admin, url) == 0


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_under_a_role_limited_to_three_connections_finish_exactly_n(limited_database, tmp_path: Path,
                                                                                 data_dir: Path) -> None:
    url = limited_database(role_limit=3)
    spec = tiny_spec(tmp_path, "squeezed", n_trials=6)
    completed = run_cli(*study_args(spec, data_dir, "--workers", "4", "--storage", url), cwd=tmp_path,
                        env={"SWEEPBENCH_RETRY_SECONDS": str(RETRY_SECONDS)}, timeout=600)
    assert completed.returncode == 0, completed.stderr
    admin_url = sqlalchemy.engine.make_url(normalize_storage_url(url)).set(username="postgres")
    study = optuna.load_study(study_name="squeezed", storage=admin_url.render_as_string(hide_password=False))
    assert_exactly(study, 6)
    assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) >= 2, "workers ran side by side"
