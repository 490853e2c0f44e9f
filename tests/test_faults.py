"""Faults a long study meets on a team's servers, reproduced on real ones: a private PostgreSQL restarted and
stopped, a real ``mlflow server`` stopped for longer than MLflow's retries, stdout closed, a worker paused past
its grace period, a tracking store's SQLite file locked past SQLite's timeout, the parent process SIGKILLed. Each
ends with exactly N finished trials, nothing RUNNING in Optuna or MLflow, and no finished result lost."""

from __future__ import annotations

import io
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import optuna
import pandas as pd
import pytest
import sqlalchemy
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweepbench.study import RETRY_HISTORY, RUN_ID_ATTR, WORKER_ATTR, normalize_storage_url
from sweepbench.study.storage import storage_lock
from tests.conftest import free_port, mlflow_server
from tests.test_study import assert_exactly, sqlite_storage, sqlite_tracking, study_args, write_spec

pytestmark = pytest.mark.slow

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED"}
# Short budgets, so that an outage of a few seconds outlasts both MLflow's own retries and ours.
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "SWEEPBENCH_RETRY_SECONDS": "3"}


class PrivatePostgres:
    """A PostgreSQL instance of the test's own (``initdb``/``pg_ctl`` as the postgres user, its own port and
    folder), so the test can stop and restart it."""

    def __init__(self, folder: Path, listen: str = "127.0.0.1", trusted_network: str | None = None) -> None:
        """Listening on ``listen`` (comma-separated addresses), trusting logins from ``trusted_network`` (a CIDR
        range of the test's own hosts) besides this machine's."""
        self.folder, self.port, self.listen = folder, free_port(), listen
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(PG_BIN / "initdb", "-D", self.folder / "data", "-A", "trust", "-U", "postgres")
        if trusted_network:
            with (self.folder / "data" / "pg_hba.conf").open("a") as rules:
                rules.write(f"host all all {trusted_network} trust\n")

    def _as_postgres(self, *command: object) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={self.listen}"
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.folder / "data", "-o", options, "-l",
                          self.folder / "server.log", "-w", *args)

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if PG_BIN is None or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs PostgreSQL's initdb/pg_ctl and root (to run them as the postgres user)")
    folder = Path(tempfile.mkdtemp(prefix="sweepbench-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    server = PrivatePostgres(folder)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def start_study(args: tuple[str, ...], cwd: Path, env: dict | None = None,
                stdout: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_for(condition, process: subprocess.Popen, timeout: float = 180, what: str = "condition",
             log: Path | None = None):
    """``condition()``'s first true value; the command's output (its pipe, or its ``log`` file) if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.communicate()[0] if process.stdout else log.read_text() if log else ""
            raise AssertionError(f"the command ended before {what}:\n{output}")
        with contextlib.suppress(Exception):
            value = condition()
            if value:
                return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


@functools.cache
def polled_storage(storage_url: str) -> optuna.storages.RDBStorage:
    """One storage per URL for the tests' polls, without a connection pool: a ``load_study`` of the URL per poll
    keeps a connection open per poll until garbage collection, and ten polls a second would take all of
    PostgreSQL's 100 while a slow machine starts its first trial."""
    return optuna.storages.RDBStorage(storage_url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def running_trial(storage_url: str, name: str, other_than: int | None = None,
                  worker_pid: int | None = None) -> optuna.trial.FrozenTrial | None:
    """A trial in the middle of training (RUNNING, its MLflow run linked), of worker ``worker_pid`` if given."""
    study = optuna.load_study(study_name=name, storage=polled_storage(storage_url))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if RUN_ID_ATTR in trial.user_attrs and trial.number != other_than and (
                worker_pid is None or trial.user_attrs[WORKER_ATTR].endswith(f":{worker_pid}")):
            return trial
    return None


def assert_nothing_lost(storage_url: str, name: str, tracking_uri: str, n_trials: int) -> optuna.Study:
    """Exactly ``n_trials`` finished, none RUNNING; every FAIL was queued again (none counts as a real
    failure); no MLflow run RUNNING; every finished trial has a child run in the status that matches."""
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert_exactly(study, n_trials)
    retried = {number for trial in study.trials for number in trial.system_attrs.get(RETRY_HISTORY, [])}
    failed = [trial.number for trial in study.get_trials(states=(TrialState.FAIL,))]
    assert set(failed) <= retried, f"trials {failed} failed for good; retried: {sorted(retried)}"
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    assert not [run.info.run_name for run in runs if run.info.status == "RUNNING"]
    by_number: dict[int, list] = {}
    for run in runs:
        if "optuna.trial_number" in run.data.tags:
            by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    for trial in study.get_trials(states=tuple(MLFLOW_STATUS)):
        statuses = {run.info.status for run in by_number.get(trial.number, [])}
        assert MLFLOW_STATUS[trial.state] in statuses, (trial.number, trial.state, statuses)
    return study


def test_the_reservation_lock_outlives_a_postgresql_restart_and_waits_out_an_outage(
        private_postgres: PrivatePostgres) -> None:
    """The reservation lock is a session lock on a connection of its own. A restart while it is held ends that
    session and the lock with it: leaving the block once crashed the worker (``pg_advisory_unlock`` on the dead
    connection, seen in the restart test below). Taking the lock while the server is down waits for it."""
    url = normalize_storage_url(private_postgres.url)
    with storage_lock(url):
        private_postgres.restart()
    private_postgres.stop()
    restarter = threading.Timer(2.0, private_postgres.start)
    restarter.start()
    started = time.monotonic()
    try:
        with storage_lock(url):
            waited = time.monotonic() - started
    finally:
        restarter.join()
    assert waited >= 1.5, waited


def test_a_postgresql_restart_and_an_outage_longer_than_the_grace_period_lose_nothing(
        tmp_path: Path, data_dir: Path, private_postgres: PrivatePostgres) -> None:
    spec = write_spec(tmp_path, "blink", n_trials=6, epochs=4, subset=8000, pruner="none")
    args = study_args(spec, data_dir, "--storage", private_postgres.url, "--workers", "2",
                      "--heartbeat-interval", "1")
    storage = normalize_storage_url(private_postgres.url)
    process = start_study(args, tmp_path, {"SWEEPBENCH_RETRY_SECONDS": "60"})
    first = wait_for(lambda: running_trial(storage, "blink"), process, what="running trial")
    private_postgres.restart()  # a blink: a fraction of a second
    wait_for(lambda: running_trial(storage, "blink", other_than=first.number), process, what="second trial")
    private_postgres.stop()
    time.sleep(5)  # longer than the grace period of three 1 s heartbeats
    private_postgres.start()
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert "study storage unreachable" in output and "study storage back after" in output, output
    assert "Traceback" not in output, output
    assert_nothing_lost(storage, "blink", sqlite_tracking(tmp_path), 6)


class RestartableServer:
    """A real ``mlflow server`` on a fixed port with its store in one folder, so it can stop and come back."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        self._running.enter_context(mlflow_server(self.folder, port=self.port))

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[RestartableServer]:
    folder = tmp_path / "server"
    folder.mkdir()
    server = RestartableServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_tracking_server_down_for_longer_than_all_retries_loses_no_trial_and_no_run(
        tmp_path: Path, data_dir: Path, restartable_server: RestartableServer) -> None:
    spec = write_spec(tmp_path, "outage", n_trials=5, epochs=6, subset=10000, pruner="none")
    args = study_args(spec, data_dir, "--tracking-uri", restartable_server.url, "--heartbeat-interval", "1")
    storage = sqlite_storage(tmp_path, "outage")
    process = start_study(args, tmp_path, SHORT_RETRIES)
    first = wait_for(lambda: running_trial(storage, "outage"), process, what="running trial")
    restartable_server.stop()
    wait_for(lambda: optuna.load_study(study_name="outage", storage=polled_storage(storage)
                                       ).trials[first.number].state.is_finished(),
             process, what="a trial finished while the server is down")
    restartable_server.start()  # about 10 s after it stopped
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert "MLflow tracking store unreachable" in output, output
    assert "Traceback" not in output, output
    assert_nothing_lost(storage, "outage", restartable_server.url, 5)


def test_a_closed_stdout_and_then_ctrl_c_fail_no_trial_and_leave_nothing_running(
        tmp_path: Path, data_dir: Path, restartable_server: RestartableServer) -> None:
    """``sweepbench study run ... | head -1``, then Ctrl-C: MLflow prints nothing into the closed pipe while it
    ends a run, so the interrupt stays an interrupt (the trial queued again), and the rerun completes."""
    spec = write_spec(tmp_path, "piped", n_trials=3, epochs=4, subset=8000, pruner="none")
    args = study_args(spec, data_dir, "--tracking-uri", restartable_server.url)
    storage = sqlite_storage(tmp_path, "piped")
    log = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=log)
    assert process.stdout.readline().startswith("study piped")
    process.stdout.close()  # like `| head -1`
    victim = wait_for(lambda: running_trial(storage, "piped"), process, what="running trial")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 128 + signal.SIGINT, (tmp_path / "stderr.log").read_text()
    errors = (tmp_path / "stderr.log").read_text()
    assert "BrokenPipeError" not in errors and "Traceback" not in errors, errors
    study = optuna.load_study(study_name="piped", storage=storage)
    assert study.trials[victim.number].state == TrialState.FAIL
    run = MlflowClient(restartable_server.url).get_run(victim.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["stop_reason"]
    rerun = subprocess.run([sys.executable, "-m", "sweepbench.cli", *args], cwd=tmp_path, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_nothing_lost(storage, "piped", restartable_server.url, 3)


def _state(stat: Path) -> str:
    """The state letter of a ``/proc/<pid>/stat`` (or a thread's ``task/<tid>/stat``) file: R, S, T, Z..."""
    return stat.read_text().rsplit(")", 1)[1].split()[0]


def _stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` has stopped (SIGSTOP reaches them a moment after ``kill`` returns)."""
    return all(_state(stat) in "Tt" for stat in Path(f"/proc/{pid}/task").glob("*/stat"))


def _holds_a_file_lock(pid: int) -> bool:
    """Whether ``pid`` holds a lock on a file: SQLite's POSIX locks, or the study's reservation lock (flock)."""
    held = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" not in line]
    return any(fields[4] == str(pid) for fields in held)


def pause_in_a_trial(storage_url: str, name: str, pid: int, process: subprocess.Popen) -> optuna.trial.FrozenTrial:
    """SIGSTOPs worker ``pid`` while it trains a trial and holds no file lock, and returns that trial. A worker
    paused in the middle of a SQLite write stops the other worker too (it waits for the lock), so nothing goes
    stale: the product's right answer, but not the fault this test is about."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        os.kill(pid, signal.SIGSTOP)
        while not _stopped(pid):
            time.sleep(0.001)
        trial = None if _holds_a_file_lock(pid) else running_trial(storage_url, name, worker_pid=pid)
        if trial is not None:
            return trial
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"worker {pid} was never paused in a trial without a file lock")


def test_a_worker_paused_past_its_grace_period_stops_its_stale_trial_quietly(tmp_path: Path,
                                                                            data_dir: Path) -> None:
    spec = write_spec(tmp_path, "paused", n_trials=5, epochs=6, subset=10000, pruner="none")
    args = study_args(spec, data_dir, "--workers", "2", "--heartbeat-interval", "1")
    storage = sqlite_storage(tmp_path, "paused")
    process = start_study(args, tmp_path)
    first = wait_for(lambda: running_trial(storage, "paused"), process, what="running trial")
    worker_pid = int(first.user_attrs[WORKER_ATTR].rsplit(":", 1)[1])
    victim = pause_in_a_trial(storage, "paused", worker_pid, process)
    time.sleep(8)  # the grace period is 3 s; the other worker marks the trial stale between its trials
    os.kill(worker_pid, signal.SIGCONT)
    output = process.communicate(timeout=600)[0]
    print(output)  # shown when an assertion below fails
    assert process.returncode == 0, output  # the paused worker did not crash
    study = assert_nothing_lost(storage, "paused", sqlite_tracking(tmp_path), 5)
    assert study.trials[victim.number].state == TrialState.FAIL, output
    assert "stops it and moves on" in output, output


HOLD_WRITE_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""
# A process that opens the store and logs a run once told to (its imports done: the lock is met, not missed).
LOG_A_RUN = """
import logging, sys, time
from sweepbench.tracking import Store
logging.basicConfig()
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
store = Store(sys.argv[1])
run_id = store.start_run(store.experiment("locked"), "run", "train")
store.end_run(run_id, "FINISHED")
print(f"{time.monotonic() - started:.1f}", flush=True)
"""


def test_a_tracking_store_locked_longer_than_sqlites_timeout_costs_a_wait_not_the_run(tmp_path: Path) -> None:
    """A process paused while it holds the MLflow SQLite file's write lock (a stopped worker in the middle of a
    log call) blocks every other process; SQLite gives up after 5 s. Once in CI, the other worker's next trial
    FAILed with "database is locked" as MLflow opened the store, outside the retry policy."""
    database = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()  # the schema exists; the writer opens it anew
    writer = subprocess.Popen([sys.executable, "-c", LOG_A_RUN, f"sqlite:///{database}"], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout.readline().strip() == "ready", writer.communicate()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(database), "8"], text=True,
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    seconds, errors = writer.communicate("go\n", timeout=120)
    assert holder.wait(timeout=60) == 0
    assert writer.returncode == 0, errors
    assert "database is locked" in errors and float(seconds) > 5, (seconds, errors)
    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("locked").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]


def _worker_pids(parent_pid: int) -> list[int]:
    """The worker processes multiprocessing spawned for ``parent_pid`` (not its resource tracker)."""
    children = subprocess.run(["pgrep", "-P", str(parent_pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]


def _alive(pid: int) -> bool:
    try:
        return _state(Path(f"/proc/{pid}/stat")) != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_workers_stop_with_their_sigkilled_parent_and_the_rerun_reconciles(tmp_path: Path,
                                                                          data_dir: Path) -> None:
    spec = write_spec(tmp_path, "orphans", n_trials=4, epochs=8, subset=20000, pruner="none")
    args = study_args(spec, data_dir, "--workers", "2", "--heartbeat-interval", "1")
    storage = sqlite_storage(tmp_path, "orphans")
    log = tmp_path / "study.log"
    with log.open("w") as output:  # a file, not a pipe: the orphaned workers would hold a pipe open
        process = start_study(args, tmp_path, stdout=output.fileno())
    wait_for(lambda: running_trial(storage, "orphans"), process, what="running trial", log=log)
    workers = wait_for(lambda: len(_worker_pids(process.pid)) == 2 and _worker_pids(process.pid), process,
                       what="both workers", log=log)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers)), "a worker outlived its parent"
    study = optuna.load_study(study_name="orphans", storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,)), "workers end their trials like Ctrl-C"
    rerun = subprocess.run([sys.executable, "-m", "sweepbench.cli", *args], cwd=tmp_path, text=True,
                           capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_nothing_lost(storage, "orphans", sqlite_tracking(tmp_path), 4)
    parent = [run for run in MlflowClient(sqlite_tracking(tmp_path)).search_runs(
        [MlflowClient(sqlite_tracking(tmp_path)).get_experiment_by_name("orphans").experiment_id])
        if run.data.tags.get("sweepbench.kind") == "study"]
    assert [run.info.status for run in parent] == ["FINISHED"]


def test_workers_started_with_other_heartbeat_intervals_use_the_studys(tmp_path: Path, data_dir: Path) -> None:
    spec = write_spec(tmp_path, "beats", n_trials=1, epochs=1, subset=1000)
    first = subprocess.run([sys.executable, "-m", "sweepbench.cli", *study_args(spec, data_dir),
                            "--heartbeat-interval", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-m", "sweepbench.cli", *study_args(spec, data_dir, "--n-trials", "2"),
                             "--heartbeat-interval", "7"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "heartbeat interval: using the study's 2 s, not 7 s" in second.stderr
    study = optuna.load_study(study_name="beats", storage=sqlite_storage(tmp_path, "beats"))
    assert study.user_attrs["heartbeat_interval"] == 2
    assert_exactly(study, 2)


@pytest.mark.parametrize("policy", ["best", "all", "none"])
def test_a_study_keeps_the_checkpoints_its_spec_asks_for(tmp_path: Path, data_dir: Path, policy: str) -> None:
    spec = write_spec(tmp_path, "kept", n_trials=3, epochs=2, subset=2000, pruner="none")
    spec.write_text(spec.read_text().replace("[budget]", f'[budget]\nkeep_checkpoints = "{policy}"'))
    completed = subprocess.run([sys.executable, "-m", "sweepbench.cli", *study_args(spec, data_dir)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    study = optuna.load_study(study_name="kept", storage=sqlite_storage(tmp_path, "kept"))
    root = tmp_path / "mlruns" / "studies" / "kept"
    kept = sorted(str(path.relative_to(root)) for path in root.rglob("*.pt"))
    best = f"trial-{study.best_trial.number:04d}"
    expected = {"best": [f"{best}/best.pt", f"{best}/final.pt"], "none": [],  # final.pt: the registered model's
                "all": [f"trial-{number:04d}/{name}" for number in range(3)
                        for name in ("best.pt", "final.pt", "last.pt")]}
    assert kept == expected[policy]
    exported = subprocess.run([sys.executable, "-m", "sweepbench.cli", "study", "export", "kept", "--storage",
                               sqlite_storage(tmp_path, "kept"), "--format", "csv"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    listed = pd.read_csv(io.StringIO(exported.stdout))["user_attrs_checkpoint"].dropna()
    assert sorted(str((tmp_path / path).resolve().relative_to(root)) for path in listed) == [
        name for name in expected[policy] if name.endswith("best.pt")]
