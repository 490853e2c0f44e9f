"""Optuna studies on real MNIST with real storages (SQLite, PostgreSQL), a real MLflow store and server, and real
worker processes killed with real signals."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import mlflow_server, run_cli
from sweepbench.config import ConfigError
from sweepbench.study.spec import load_spec
from sweepbench.study import (RETRY_HISTORY, RUN_ID_ATTR, WORKER_ATTR, export_trials, load_study, make_job,
                              normalize_storage_url, open_existing_study, open_storage, run_study, worker_seed)

MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}

SPEC = """
name = "{name}"
model = "mnist_mlp"
dataset = "mnist"
[train]
epochs = {epochs}
train_subset = {subset}
val_size = 1000
device = "cpu"
[sampler]
name = "{sampler}"
seed = {seed}
[pruner]
name = "{pruner}"
{pruner_options}
[budget]
n_trials = {n_trials}
max_failed_trials = {max_failed}
"""

SEARCH = """
[search."model_kwargs.hidden_size"]
type = "int"
low = 16
high = 64
[search.lr]
type = "float"
low = 1e-5
high = 1e-1
log = true
[search.optimizer]
type = "categorical"
choices = ["sgd", "adam"]
"""


def write_spec(directory: Path, name: str, n_trials: int = 4, epochs: int = 2, subset: int = 2000, seed: int = 0,
               max_failed: int = 10, sampler: str = "random", pruner: str = "median", search: str = SEARCH,
               extra: str = "") -> Path:
    """A small study. The default search (MLP 16-64 wide on 2,000 images, a learning rate from 1e-5 to 0.1)
    makes some trials hopeless, so that the median pruner stops them."""
    path = directory / f"{name}.toml"
    pruner_options = "n_startup_trials = 1" if pruner == "median" else ""
    settings = SPEC.format(name=name, n_trials=n_trials, epochs=epochs, subset=subset, seed=seed, sampler=sampler,
                           pruner=pruner, pruner_options=pruner_options, max_failed=max_failed)
    path.write_text(settings + search + extra)
    return path


def sqlite_storage(directory: Path, name: str) -> str:
    return f"sqlite:///{directory}/mlruns/studies/{name}.db"


def sqlite_tracking(directory: Path) -> str:
    return f"sqlite:///{directory}/mlruns/mlflow.db"


def study_args(spec: Path, data_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("study", "run", str(spec), "--data-dir", str(data_dir), *extra)


def mlflow_runs(tracking_uri: str, experiment: str) -> tuple:
    """The study's parent run and its child runs."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("sweepbench.kind") == "study"]
    assert len(parents) == 1, [run.info.run_name for run in runs]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1, "every other run is a child of the study's run"
    return parents[0], children


def assert_runs_match_trials(study: optuna.Study, tracking_uri: str) -> tuple:
    """One child run per trial that started, carrying its number and params, in the state that matches."""
    parent, children = mlflow_runs(tracking_uri, study.study_name)
    by_number = {int(run.data.tags["optuna.trial_number"]): run for run in children}
    assert len(by_number) == len(children), "no trial has two child runs"
    started = [trial for trial in study.trials if trial.state != TrialState.WAITING]
    assert sorted(by_number) == [trial.number for trial in started]
    for trial in started:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ID_ATTR]
        assert run.info.status == MLFLOW_STATUS[trial.state], (trial.number, trial.state)
        for name, value in trial.params.items():
            assert run.data.params[name] == str(value)
    return parent, by_number


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def assert_exactly(study: optuna.Study, n_trials: int) -> None:
    numbers = [trial.number for trial in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len(finished(study)) == n_trials
    assert not study.get_trials(states=(TrialState.RUNNING,))


def failures(study: optuna.Study) -> dict[int, str]:
    """The FAIL trials' numbers with the error each recorded: what an assertion that none failed shows."""
    return {trial.number: trial.user_attrs.get("error", "") for trial in study.get_trials(states=(TrialState.FAIL,))}


def run_in_process(directory: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                   **spec_args) -> optuna.Study:
    """Runs a small study in this process (no start-up cost), from ``directory``; it must reach its target."""
    spec = load_spec(write_spec(directory, name, **spec_args)).with_overrides(data_dir=str(data_dir))
    monkeypatch.chdir(directory)
    outcome = run_study(make_job(spec, tracking_uri=sqlite_tracking(directory)))
    assert outcome.status == "FINISHED" and outcome.reason().startswith("reached its target")
    assert_exactly(outcome.study, outcome.job.spec.target_trials())
    return outcome.study


GRID = """
[search.batch_size]
type = "categorical"
choices = [64, 128]
[search.weight_decay]
type = "float"
low = 0.0
high = 0.001
step = 0.001
"""


@pytest.fixture(scope="module")
def pruning_study(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """A 6-trial study built to prune, run once in this process; the tests below read it."""
    directory = tmp_path_factory.mktemp("pruning-study")
    spec = load_spec(write_spec(directory, "prunes", n_trials=6, epochs=3)).with_overrides(data_dir=str(data_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        outcome = run_study(make_job(spec, tracking_uri=sqlite_tracking(directory), heartbeat_interval=2))
    return directory, outcome


@pytest.mark.slow
def test_a_quick_study_on_mnist_gives_trials_and_matching_mlflow_runs(pruning_study) -> None:
    directory, outcome = pruning_study
    study = optuna.load_study(study_name="prunes", storage=sqlite_storage(directory, "prunes"))
    assert outcome.status == "FINISHED"
    assert_exactly(study, 6)
    states = {trial.state for trial in study.trials}
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states, "a study built to prune prunes"
    assert all(len(trial.intermediate_values) < 3 for trial in study.get_trials(states=(TrialState.PRUNED,))), \
        "no trial is pruned after its last epoch"
    parent, children = assert_runs_match_trials(study, sqlite_tracking(directory))
    client = MlflowClient(sqlite_tracking(directory))
    for trial in study.trials:
        curve = client.get_metric_history(children[trial.number].info.run_id, "val_accuracy")
        reported = sorted(trial.intermediate_values.items())
        assert [(metric.step, metric.value) for metric in curve] == reported, "partial curves are kept"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert {name: parent.data.tags[f"best.{name}"] for name in study.best_params} == \
        {name: str(value) for name, value in study.best_params.items()}
    artifacts = {item.path for folder in ("", "plots", "best_checkpoint")
                 for item in client.list_artifacts(parent.info.run_id, folder or None)}
    plots = {f"plots/{name}.png" for name in
             ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")}
    assert {"trials.csv", "spec", "best_checkpoint/best.pt", *plots} <= artifacts
    assert client.get_metric_history(parent.info.run_id, "system/cpu_utilization_percentage"), \
        "the parent run has MLflow's system metrics"
    assert not [name for run in children.values() for name in run.data.metrics if name.startswith("system/")]


@pytest.mark.slow
def test_a_trial_is_never_pruned_after_its_last_epoch(tmp_path: Path, data_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch a trial: the median pruner sees every trial's value (each is reported) but may not throw a
    finished trial away, as it did (to trial 2 first, with these seeds) when it was asked after the last epoch
    too."""
    study = run_in_process(tmp_path, data_dir, monkeypatch, "last-epoch", n_trials=5, epochs=1)
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 5
    assert [list(trial.intermediate_values) for trial in study.trials] == [[1]] * 5
    assert study.best_value == max(trial.value for trial in study.trials)


@pytest.mark.slow
def test_study_show_and_export_read_the_stored_study(pruning_study) -> None:
    directory, outcome = pruning_study
    shown = run_cli("study", "show", "prunes", cwd=directory, check=True).stdout
    best = outcome.study.best_trial
    assert f"best trial #{best.number}: val_accuracy {best.value:.4f}" in shown
    assert "parameter importance for val_accuracy" in shown
    finished_trials = finished(outcome.study)
    duration = sum(trial.duration.total_seconds() for trial in finished_trials)
    outside = 1 - sum(trial.user_attrs["engine_seconds"] for trial in finished_trials) / duration
    tracking = sum(trial.user_attrs["tracking_seconds"] for trial in finished_trials) / duration
    assert 0 < tracking < outside < 1
    assert (f"bookkeeping (Optuna + MLflow): {100 * outside:.1f}% of trial time: MLflow tracking "
            f"{100 * tracking:.1f}%, Optuna (sampler, pruner, storage) {100 * (outside - tracking):.1f}%") in shown
    assert all(name in shown.split("parameter importance")[1] for name in best.params)
    csv = run_cli("study", "export", "prunes", "--format", "csv", cwd=directory, check=True).stdout
    table = pd.read_csv(io.StringIO(csv))
    assert sorted(table["number"]) == list(range(6)) and "value_val_accuracy" in table.columns
    output = directory / "trials.html"
    run_cli("study", "export", "prunes", "--format", "html", "--output", str(output), cwd=directory, check=True)
    assert "<table" in output.read_text()
    assert export_trials(outcome.study, "md").startswith("|")
    with pytest.raises(ConfigError, match="no study 'nothing-here' in sqlite:///.*; studies there: prunes"):
        open_existing_study("nothing-here", sqlite_storage(directory, "prunes"))


@pytest.mark.slow
def test_a_trial_that_raises_is_fail_and_the_study_goes_on(tmp_path: Path, data_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """tf32 is a valid setting that the engine rejects on a CPU: a real error, raised inside the trial."""
    extra = '[search.precision]\ntype = "categorical"\nchoices = ["fp32", "tf32"]\n'
    study = run_in_process(tmp_path, data_dir, monkeypatch, "raises", n_trials=3, extra=extra)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(trial.params["precision"] == "tf32" for trial in failed)
    assert all("precision: 'tf32' needs device cuda" in trial.user_attrs["error"] for trial in failed)
    _, children = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert all("needs device cuda" in children[trial.number].data.tags["error"] for trial in failed)


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_stops_at_max_failed_trials(tmp_path: Path, data_dir: Path) -> None:
    extra = '[search.precision]\ntype = "categorical"\nchoices = ["tf32"]\n'
    spec = write_spec(tmp_path, "all-fail", n_trials=5, max_failed=2, extra=extra)
    completed = run_cli(*study_args(spec, data_dir), cwd=tmp_path)
    assert completed.returncode == 1, completed.stderr
    assert "stopped after 2 failed trials (max_failed_trials = 2)" in completed.stdout
    study = optuna.load_study(study_name="all-fail", storage=sqlite_storage(tmp_path, "all-fail"))
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    parent, _ = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_a_grid_study_runs_each_point_once_and_stops_at_the_grid_size(tmp_path: Path, data_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    study = run_in_process(tmp_path, data_dir, monkeypatch, "grid", n_trials=50, sampler="grid", search=GRID)
    assert sorted((t.params["batch_size"], t.params["weight_decay"]) for t in study.trials) == \
        [(64, 0.0), (64, 0.001), (128, 0.0), (128, 0.001)]


@pytest.mark.slow
def test_a_pareto_study_records_both_objectives_and_its_front(tmp_path: Path, data_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    objectives = '[[objective]]\nmetric = "val_accuracy"\n[[objective]]\nmetric = "train_seconds"\n'
    study = run_in_process(tmp_path, data_dir, monkeypatch, "pareto", n_trials=3, pruner="none", extra=objectives)
    assert study.metric_names == ["val_accuracy", "train_seconds"]
    assert all(len(trial.values) == 2 for trial in study.trials)
    parent, _ = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert parent.data.tags["pareto_trial_numbers"] == ",".join(str(t.number) for t in study.best_trials)
    plots = MlflowClient(sqlite_tracking(tmp_path)).list_artifacts(parent.info.run_id, "plots")
    assert "plots/pareto_front.png" in {item.path for item in plots}


def wait_for_running_trial(directory: Path, name: str, process: subprocess.Popen, timeout: float = 180,
                           members: int = 1) -> optuna.trial.FrozenTrial:
    """The first trial seen RUNNING with its MLflow run started, i.e. in the middle of training; with
    ``members``, once that many trials run and every running trial is linked to its run (a pack in training:
    its members' runs are created one after another, so a kill any earlier finds one run not yet linked).
    Polls the SQLite file read-only, so the test never races the command to create the database."""
    database = directory / "mlruns" / "studies" / f"{name}.db"
    query = ("SELECT trials.number, trial_user_attributes.key IS NOT NULL FROM trials LEFT JOIN "
             f"trial_user_attributes ON trial_user_attributes.trial_id = trials.trial_id AND "
             f"trial_user_attributes.key = '{RUN_ID_ATTR}' WHERE trials.state = 'RUNNING' ORDER BY trials.number")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        with contextlib.suppress(sqlite3.OperationalError), \
                contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            running = connection.execute(query).fetchall()
            linked = [number for number, has_run in running if has_run]
            if linked and (members == 1 or (len(running) >= members and len(linked) == len(running))):
                study = optuna.load_study(study_name=name, storage=sqlite_storage(directory, name))
                return study.trials[linked[0]]
        time.sleep(0.05)
    raise AssertionError(f"no trial was seen running within {timeout} s")


def start_cli(args: tuple[str, ...], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_study_resumed_after_sigkill_ends_with_exactly_n_finished_and_none_running(tmp_path: Path,
                                                                                     data_dir: Path) -> None:
    spec = write_spec(tmp_path, "killed", n_trials=3, epochs=3, subset=10000, seed=1)
    args = study_args(spec, data_dir, "--heartbeat-interval", "1")
    storage = sqlite_storage(tmp_path, "killed")
    process = start_cli(args, tmp_path)
    victim = wait_for_running_trial(tmp_path, "killed", process)
    process.kill()
    process.communicate()
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"resuming study 'killed': \d of 3 trials finished \(\d complete, \d pruned\), 0 failed; "
                     r"1 running \(another worker's, or left by a process that is gone: .*\); \d to run",
                     resumed.stderr), resumed.stderr
    study = optuna.load_study(study_name="killed", storage=storage)
    assert_exactly(study, 3)
    assert study.trials[victim.number].state == TrialState.FAIL
    retries = [trial for trial in study.trials if trial.system_attrs.get(RETRY_HISTORY) == [victim.number]]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state.is_finished()
    parent, children = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert "stopped sending heartbeats" in children[victim.number].data.tags["error"]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("signum, message", [(signal.SIGINT, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_marks_the_current_trial_and_queues_it_again(tmp_path: Path, data_dir: Path, signum: int,
                                                                        message: str) -> None:
    spec = write_spec(tmp_path, "interrupted", n_trials=3, epochs=3, subset=10000, seed=1)
    storage = sqlite_storage(tmp_path, "interrupted")
    process = start_cli(study_args(spec, data_dir), tmp_path)
    victim = wait_for_running_trial(tmp_path, "interrupted", process)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signum, output
    study = optuna.load_study(study_name="interrupted", storage=storage)
    assert study.trials[victim.number].state == TrialState.FAIL
    assert study.trials[victim.number].user_attrs["error"] == message
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [trial.system_attrs[RETRY_HISTORY] for trial in queued] == [[victim.number]]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    parent, children = mlflow_runs(sqlite_tracking(tmp_path), "interrupted")
    assert parent.info.status == "KILLED"
    assert {run.info.status for run in children if run.data.tags["optuna.trial_number"] == str(victim.number)} \
        == {"KILLED"}
    if signum == signal.SIGINT:
        resumed = run_cli(*study_args(spec, data_dir), cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert f"queued again: trial {victim.number} as {queued[0].number}; " in resumed.stderr, resumed.stderr
        assert_exactly(optuna.load_study(study_name="interrupted", storage=storage), 3)


def test_workers_starting_at_the_same_point_on_two_machines_get_different_seeds(tmp_path: Path) -> None:
    """The first claimant of (trial count, worker index) keeps the reproducible seed, the spec's own for a new
    study; a worker elsewhere at the same point gets another, so it does not replay the same random trials."""
    spec = load_spec(write_spec(tmp_path, "seeds", seed=7))
    job = make_job(spec, storage_url=sqlite_storage(tmp_path, "seeds"), tracking_uri=sqlite_tracking(tmp_path))
    study = load_study(job, open_storage(job))
    first = worker_seed(spec, study, job.storage_url, 0, claimant="host-a:101")
    other_machine = worker_seed(spec, study, job.storage_url, 0, claimant="host-b:202")
    third_machine = worker_seed(spec, study, job.storage_url, 0, claimant="host-c:303")
    assert first == 7 and len({first, other_machine, third_machine}) == 3
    assert worker_seed(spec, study, job.storage_url, 0, claimant="host-a:101") == first
    second_worker = worker_seed(spec, study, job.storage_url, 1, claimant="host-a:101")
    assert second_worker not in (first, other_machine, third_machine)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    assert worker_seed(spec, study, job.storage_url, 0, claimant="host-b:202") not in (first, other_machine)


@pytest.mark.slow
def test_two_local_workers_share_one_storage_and_stop_at_exactly_n(tmp_path: Path, data_dir: Path) -> None:
    spec = write_spec(tmp_path, "parallel", n_trials=5, subset=10000)
    completed = run_cli(*study_args(spec, data_dir, "--workers", "2"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    study = optuna.load_study(study_name="parallel", storage=sqlite_storage(tmp_path, "parallel"))
    assert_exactly(study, 5)
    assert not failures(study)
    assert [trial.number for trial in study.trials] == list(range(5))
    assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) == 2, "both workers ran trials"
    parent, _ = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert parent.info.status == "FINISHED"


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with its own store and artifact folder."""
    with mlflow_server(tmp_path) as url:
        yield url


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_on_two_commands_share_a_postgresql_study_and_an_mlflow_server(
        tmp_path: Path, data_dir: Path, postgres_url: str, tracking_server: str) -> None:
    """Optuna's distributed mode: two independent ``study run`` commands (as on two machines) on one storage."""
    spec = write_spec(tmp_path, "distributed", n_trials=5, subset=10000)
    args = study_args(spec, data_dir, "--storage", postgres_url, "--tracking-uri", tracking_server)
    workers = [start_cli(args, tmp_path) for _ in range(2)]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="distributed", storage=normalize_storage_url(postgres_url))
    assert_exactly(study, 5)
    assert not failures(study)
    assert [trial.number for trial in study.trials] == list(range(5))
    assert len({trial.user_attrs[WORKER_ATTR] for trial in study.trials}) == 2, "both workers ran trials"
    parent, _ = assert_runs_match_trials(study, tracking_server)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert "trials.csv" in {item.path for item in MlflowClient(tracking_server).list_artifacts(parent.info.run_id)}
