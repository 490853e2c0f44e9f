"""Studies across machines through Optuna's gRPC storage proxy (``sweepbench storage serve``, ``--storage
grpc://``) and ``sweepbench study worker``, on this machine: the proxy's lock, heartbeats judged by each worker's
own clock, a head and a worker sharing a study to exactly N, a killed worker's trial run again. The same with
eight hosts, one cut off, is tests/test_many_hosts.py."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import grpc
import optuna
import pytest
from optuna.trial import TrialState

from sweepbench.retry import is_transient
from sweepbench.study import RETRY_HISTORY, WORKER_ATTR, normalize_storage_url
from sweepbench.study.storage import StaleTrialHandler, locks, open_existing_study, reader, stored_study_names
from sweepbench.study.storage.heartbeat import BEAT_ATTR, ProgressHeartbeat
from sweepbench.study.storage.proxy import grpc_proxy
from sweepbench.study.storage.retrying import RetryingStorage
from tests.conftest import run_cli, storage_proxy
from tests.test_study import (assert_exactly, assert_runs_match_trials, failures, sqlite_tracking, start_cli,
                              study_args, write_spec)

GRPC_STUDY = "through-proxy"


@pytest.fixture
def proxy(tmp_path: Path):
    """A real proxy in front of a SQLite file of the test's own."""
    with storage_proxy(f"sqlite:///{tmp_path / 'proxy.db'}", tmp_path) as url:
        yield url


def test_the_proxy_lock_admits_one_holder_at_a_time(proxy: str) -> None:
    inside, most, held = [0], [0], []
    guard = threading.Lock()

    def contend() -> None:
        for _ in range(15):
            with locks.storage_lock(proxy) as lease:
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                held.append(lease.held())
                time.sleep(0.002)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(held) == 60 and all(held)
    assert stored_study_names(proxy) == [], "the lock is no study, and none is left behind"


def test_a_lock_whose_holder_stalls_past_the_lease_is_taken_and_the_holder_is_told(
        proxy: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(locks, "MUTEX_LEASE_SECONDS", 1.0)
    stalled = locks.study_mutex(proxy)
    lease = stalled.__enter__()
    started = time.monotonic()
    with locks.storage_lock(proxy) as taken:
        waited = time.monotonic() - started
        assert taken.held() and not lease.held()
    assert 1.0 < waited < 10, waited
    stalled.__exit__(None, None, None)
    assert "the storage lock was taken from this process while it held it" in caplog.text
    assert "taking it" in caplog.text


def test_a_holder_that_renews_keeps_the_lock_past_the_lease_and_waiters_wait(
        proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "MUTEX_LEASE_SECONDS", 1.0)
    released = []
    with locks.storage_lock(proxy) as lease:
        def waiter() -> None:
            with locks.storage_lock(proxy):
                released.append(time.monotonic())

        thread = threading.Thread(target=waiter)
        thread.start()
        for _ in range(6):  # 3 s, three leases, renewed every half lease
            time.sleep(0.5)
            lease.renew()
        assert lease.held() and not released
        done = time.monotonic()
    thread.join()
    assert released and released[0] >= done


@pytest.mark.postgres
def test_a_postgresql_lock_whose_connection_is_gone_is_no_longer_held(postgres_url: str, postgres_admin) -> None:
    url = normalize_storage_url(postgres_url)
    with locks.storage_lock(url) as lease:
        assert lease.held()
        with postgres_admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND "
                           "objid = %s", (locks.ADVISORY_LOCK_KEY & 0xFFFFFFFF,))
        deadline = time.monotonic() + 10
        while lease.held() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not lease.held(), "a reservation made now would not be run"


def test_a_trial_whose_beats_stop_is_failed_once_this_worker_saw_no_beat_for_the_grace(proxy: str) -> None:
    storage = grpc_proxy(proxy)
    study = optuna.create_study(study_name="beats", storage=storage)
    beating, silent = study.ask(), study.ask()
    heartbeat = ProgressHeartbeat(storage, interval=1, grace=1.0, callback=StaleTrialHandler("sqlite:///unused.db"))
    for trial in (beating, silent):
        heartbeat.record_heartbeat(trial._trial_id)
    assert heartbeat._get_stale_trial_ids(study._study_id) == [], "a worker that just came judges no one"
    time.sleep(0.6)
    heartbeat.record_heartbeat(beating._trial_id)
    time.sleep(0.6)
    assert heartbeat._get_stale_trial_ids(study._study_id) == [silent._trial_id]
    observed = optuna.load_study(study_name="beats", storage=RetryingStorage(storage, heartbeat=heartbeat))
    optuna.storages.fail_stale_trials(observed)
    trials = observed.get_trials(deepcopy=False)
    assert [trial.state for trial in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].system_attrs[RETRY_HISTORY] == [silent.number], "queued again with its parameters"
    heartbeat.record_heartbeat(silent._trial_id)  # its worker comes back: an ended trial takes no beat, quietly
    assert BEAT_ATTR in observed.trials[0].system_attrs


def test_transient_grpc_faults_are_retried_and_others_are_not(proxy: str) -> None:
    with pytest.raises(grpc.RpcError) as unavailable:
        grpc_proxy("grpc://127.0.0.1:1").get_all_studies()
    assert is_transient(unavailable.value)
    with pytest.raises(KeyError):  # NOT_FOUND: the client's own KeyError, a mistake, not an outage
        grpc_proxy(proxy).get_study_id_from_name("nothing")


@pytest.mark.slow
def test_a_head_and_a_worker_through_the_proxy_end_with_exactly_n_each_with_its_run(
        tmp_path: Path, data_dir: Path, proxy: str) -> None:
    spec = write_spec(tmp_path, GRPC_STUDY, n_trials=8, epochs=2, subset=2000)
    tracking = sqlite_tracking(tmp_path)
    head = start_cli(study_args(spec, data_dir, "--storage", proxy, "--tracking-uri", tracking, "--workers", "2",
                                "--heartbeat-interval", "2"), tmp_path)
    worker = run_cli("study", "worker", str(spec), "--storage", proxy, "--tracking-uri", tracking,
                     "--data-dir", str(data_dir), "--wait", "120", cwd=tmp_path, timeout=400)
    output = head.communicate(timeout=400)[0]
    assert head.returncode == 0, output
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert re.search(r"joined study 'through-proxy': \d of 8 trials finished", worker.stderr), worker.stderr
    assert "this worker is done" in worker.stdout
    study = open_existing_study(GRPC_STUDY, proxy)
    assert_exactly(study, 8)
    assert not failures(study)
    assert [trial.number for trial in study.trials] == list(range(8))
    assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) >= 2
    parent, _ = assert_runs_match_trials(study, tracking)
    assert parent.info.status == "FINISHED"
    assert stored_study_names(proxy) == [GRPC_STUDY]


@pytest.mark.slow
def test_a_killed_worker_through_the_proxy_is_failed_by_another_and_its_trial_runs_again(
        tmp_path: Path, data_dir: Path, proxy: str) -> None:
    spec = write_spec(tmp_path, GRPC_STUDY, n_trials=4, epochs=3, subset=10000, pruner="none")
    tracking = sqlite_tracking(tmp_path)
    head = start_cli(study_args(spec, data_dir, "--storage", proxy, "--tracking-uri", tracking,
                                "--heartbeat-interval", "1"), tmp_path)
    victim = start_cli(("study", "worker", str(spec), "--storage", proxy, "--tracking-uri", tracking,
                        "--data-dir", str(data_dir)), tmp_path)
    victim_trial = wait_for_worker_trial(proxy, victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    output = head.communicate(timeout=400)[0]
    assert head.returncode == 0, output
    assert f"trial {victim_trial}: its worker stopped sending heartbeats; marked FAIL, queued again" in output
    study = open_existing_study(GRPC_STUDY, proxy)
    assert_exactly(study, 4)
    assert study.trials[victim_trial].state == TrialState.FAIL
    retried = [trial for trial in study.trials if trial.system_attrs.get(RETRY_HISTORY) == [victim_trial]]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == study.trials[victim_trial].params
    assert_runs_match_trials(study, tracking)


def wait_for_worker_trial(proxy: str, worker, timeout: float = 180) -> int:
    """The number of the first trial that ``worker`` (a ``study worker`` process) runs, once it trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.communicate()[0]
        if GRPC_STUDY in stored_study_names(proxy):
            study = optuna.load_study(study_name=GRPC_STUDY, storage=reader(proxy))
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if trial.user_attrs.get(WORKER_ATTR, "").endswith(f":{worker.pid}") and "mlflow_run_id" in \
                        trial.user_attrs:
                    return trial.number
        time.sleep(0.2)
    raise AssertionError(f"the worker ran no trial within {timeout} s")


def test_a_worker_gives_up_in_one_line_on_a_study_that_is_not_started(tmp_path: Path, data_dir: Path,
                                                                      proxy: str) -> None:
    spec = write_spec(tmp_path, "never-started")
    completed = run_cli("study", "worker", str(spec), "--storage", proxy, "--data-dir", str(data_dir),
                        "--wait", "1", cwd=tmp_path, timeout=120)
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if line.startswith("sweepbench: error:")]
    assert len(errors) == 1 and "study 'never-started' was not started in grpc://127.0.0.1:" in errors[0], \
        completed.stderr
    assert "Traceback" not in completed.stderr
