"""Runs whose process is gone: a real ``sweepbench train`` SIGKILLed mid-run stays RUNNING until
``sweepbench runs reconcile``, or the next ``sweepbench train`` in its experiment, ends it KILLED; runs whose process
is alive, runs of other hosts and study trials are left alone. Real SQLite stores, real processes."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from mlflow import MlflowClient

from sweepbench.tracking import Store, process_tags, reconcile_dead_runs
from sweepbench.tracking.reconcile import HOST_TAG, PID_STARTED_TAG, PID_TAG
from tests.conftest import run_cli

TRAIN_ARGS = ("--model", "mnist_mlp", "--dataset", "mnist", "--model-arg", "hidden_size=32", "--train-subset",
              "2000", "--device", "cpu")


def wait_for_running_run(database: Path, process: subprocess.Popen, timeout: float = 180,
                         known: tuple[str, ...] = ()) -> str:
    """The id of the first run but the ``known`` ones seen RUNNING in the SQLite store ``database``, read-only (the
    test never races the command to create the file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with contextlib.suppress(sqlite3.OperationalError), \
                contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            ids = connection.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()
            new = [run_id for run_id, in ids if run_id not in known]
            if new:
                return new[0]
        time.sleep(0.05)
    raise AssertionError(f"no run was seen RUNNING in {database} within {timeout} s")


def killed_train_run(folder: Path, data_dir: Path, experiment: str = "train",
                     known: tuple[str, ...] = ()) -> tuple[str, int]:
    """A real ``sweepbench train`` in ``folder``'s store, SIGKILLed once its run is RUNNING; (run id, pid)."""
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "train", *TRAIN_ARGS, "--epochs", "500",
                                "--experiment", experiment, "--data-dir", str(data_dir), "--tracking-uri",
                                store_uri(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_id = wait_for_running_run(folder / "mlflow.db", process, known=known)
    finally:
        process.kill()
        process.wait()
    return run_id, process.pid


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def reason(pid: int) -> str:
    return f"its process ({platform.node()}:{pid}) is gone; reconciled by sweepbench"


@pytest.mark.slow
def test_a_sigkilled_train_run_stays_running_until_runs_reconcile_ends_it_killed(tmp_path: Path,
                                                                                 data_dir: Path) -> None:
    run_id, pid = killed_train_run(tmp_path, data_dir)
    client = MlflowClient(store_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[HOST_TAG] == platform.node() and run.data.tags[PID_TAG] == str(pid)
    assert float(run.data.tags[PID_STARTED_TAG]) == pytest.approx(time.time(), abs=600)
    completed = run_cli("runs", "reconcile", "--experiment", "train", "--tracking-uri", store_uri(tmp_path),
                        timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"ended MLflow run {run_id} ") and f":{pid})" in lines[0]
    assert lines[1].startswith("reconciled: 1 RUNNING run(s) ended KILLED; left RUNNING: 0 whose process runs, 0 "
                               "of other hosts")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == reason(pid)
    again = run_cli("runs", "reconcile", "--tracking-uri", store_uri(tmp_path), timeout=120)
    assert again.stdout.startswith("reconciled: 0 RUNNING run(s) ended KILLED"), again.stdout + again.stderr


@pytest.mark.slow
def test_the_next_train_in_the_experiment_ends_its_dead_runs_and_no_others(tmp_path: Path, data_dir: Path) -> None:
    run_id, pid = killed_train_run(tmp_path, data_dir)
    other_id, _ = killed_train_run(tmp_path, data_dir, experiment="other", known=(run_id,))
    completed = run_cli("train", *TRAIN_ARGS, "--epochs", "1", "--data-dir", str(data_dir), "--tracking-uri",
                        store_uri(tmp_path), timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert f"sweepbench: note: ended MLflow run {run_id} " in completed.stderr
    client = MlflowClient(store_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == reason(pid)
    assert client.get_run(other_id).info.status == "RUNNING"  # another experiment: left for its own reconcile
    statuses = [run.info.status for run in client.search_runs([run.info.experiment_id])]
    assert sorted(statuses) == ["FINISHED", "KILLED"]


BENCH = """
[benchmark]
name = "killed"
repeats = 2
[grid]
precisions = ["cpu/fp32"]
batch_sizes = [64, 128]
[defaults]
dataset = "mnist"
train_subset = 2000
epochs = 500
[[models]]
model = "mnist_mlp"
model_kwargs = { hidden_size = 32 }
"""


@pytest.mark.slow
def test_a_sigkilled_benchmark_leaves_nothing_running_after_runs_reconcile(tmp_path: Path, data_dir: Path) -> None:
    """The benchmark's parent run is ended with its cells and repeat: its process is gone too."""
    spec = tmp_path / "killed.toml"
    spec.write_text(BENCH)
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "bench", str(spec), "--data-dir",
                                str(data_dir), "--tracking-uri", store_uri(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen: tuple[str, ...] = ()
        for _ in range(4):  # the parent, both cells and the first repeat
            seen = (*seen, wait_for_running_run(tmp_path / "mlflow.db", process, known=seen))
    finally:
        process.kill()
        process.wait()
    completed = run_cli("runs", "reconcile", "--tracking-uri", store_uri(tmp_path), timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "reconciled: 4 RUNNING run(s) ended KILLED" in completed.stdout
    client = MlflowClient(store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("bench-killed").experiment_id])
    assert sorted(run.data.tags["sweepbench.kind"] for run in runs) == ["bench", "cell", "cell", "repeat"]
    assert {run.info.status for run in runs} == {"KILLED"}
    assert {run.data.tags["stop_reason"] for run in runs} == {reason(process.pid)}


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def zombie() -> Iterator[psutil.Process]:
    """A child that has exited and is not reaped yet: a zombie, its pid still taken."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    child = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    yield child
    process.wait()


def test_only_runs_of_this_host_whose_process_is_gone_are_ended(tmp_path: Path, gone_pid: int,
                                                                 zombie: psutil.Process) -> None:
    store = Store(store_uri(tmp_path))
    experiment_id = store.experiment("reconcile")
    here = process_tags()
    runs = {
        "alive": (here, "train"),
        "gone": ({**here, PID_TAG: str(gone_pid)}, "train"),
        "pid reused": ({**here, PID_STARTED_TAG: "1.00"}, "train"),  # this process's pid, another start time
        "ticks tag": ({**here, PID_STARTED_TAG: "123456"}, "train"),  # an older version's start time: unknown
        "zombie": ({**here, PID_TAG: str(zombie.pid), PID_STARTED_TAG: f"{zombie.create_time():.2f}"}, "train"),
        "other host": ({**here, HOST_TAG: "elsewhere.example", PID_TAG: str(gone_pid)}, "train"),
        "study trial": ({**here, PID_TAG: str(gone_pid)}, "trial"),  # reconciled with Optuna by study run
        "untagged": ({}, "train"),
    }
    ids = {name: store.start_run(experiment_id, name, kind, tags) for name, (tags, kind) in runs.items()}
    checked = {run.run_name: run for run in reconcile_dead_runs(store)}
    assert set(checked) == {"alive", "gone", "pid reused", "ticks tag", "zombie", "other host"}
    assert {name for name, run in checked.items() if run.ended} == {"gone", "pid reused", "zombie"}
    assert [name for name, run in checked.items() if run.elsewhere] == ["other host"]
    statuses = {name: store.client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert statuses == {"alive": "RUNNING", "gone": "KILLED", "pid reused": "KILLED", "ticks tag": "RUNNING",
                        "zombie": "KILLED", "other host": "RUNNING", "study trial": "RUNNING", "untagged": "RUNNING"}
    assert store.client.get_run(ids["gone"]).data.tags["stop_reason"] == reason(gone_pid)
    assert store.client.get_run(ids["pid reused"]).data.tags["stop_reason"] == reason(os.getpid())


def test_reconcile_creates_no_store_and_names_unknown_experiments(tmp_path: Path) -> None:
    assert reconcile_dead_runs(Store(store_uri(tmp_path))) == [] and not list(tmp_path.iterdir())
    missing = run_cli("runs", "reconcile", "--tracking-uri", store_uri(tmp_path), timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not list(tmp_path.iterdir())
    Store(store_uri(tmp_path)).experiment("train")
    unknown = run_cli("runs", "reconcile", "--experiment", "nope", "--tracking-uri", store_uri(tmp_path), timeout=120)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (f"sweepbench: error: --experiment: no experiment 'nope' in "
                                      f"{store_uri(tmp_path)}; experiments there: Default, train")
