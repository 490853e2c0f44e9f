"""MLflow's own views, filled by MLflow's own mechanisms (issue 23), read back with MlflowClient: the best model of
a study registered under the study's name with the alias ``best`` (it predicts the test set to the test accuracy
logged on its run, and follows a resumed study's new best), ``train --register``, pruned trials FINISHED and
named so, trial run names with their parameters, the parent run's description, and ``study dashboard``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow import MlflowClient

from sweepbench.data import load_dataset
from sweepbench.engine import normalise
from sweepbench.tracking.models import fluent_tracking_uri
from tests.test_study import mlflow_runs, sqlite_storage, sqlite_tracking, study_args, write_spec


def cli(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "sweepbench.cli", *args], cwd=folder, capture_output=True,
                               text=True, timeout=600)
    assert not check or completed.returncode == 0, completed.stderr
    return completed


def registered_model_accuracy(model_uri: str, tracking_uri: str, data_dir: Path) -> float:
    """The test accuracy of the registered model, loaded by its models:/ URI as a user loads it."""
    with fluent_tracking_uri(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri)
    mnist = load_dataset("mnist", str(data_dir))
    with torch.inference_mode():
        predicted = model(normalise(mnist.x_test, mnist.mean, mnist.std)).argmax(1)
    return (predicted == mnist.y_test).double().mean().item()


@pytest.mark.slow
def test_a_study_registers_its_best_model_and_moves_best_to_a_resumed_studys_new_best(tmp_path: Path,
                                                                                     data_dir: Path) -> None:
    spec = write_spec(tmp_path, "registered", n_trials=3, epochs=2, subset=2000, sampler="random", seed=1)
    tracking, client = sqlite_tracking(tmp_path), MlflowClient(sqlite_tracking(tmp_path))
    for n_trials in (3, 6):
        ran = cli(tmp_path, *study_args(spec, data_dir, "--n-trials", str(n_trials)))
        study = optuna.load_study(study_name="registered", storage=sqlite_storage(tmp_path, "registered"))
        best = study.best_trial
        version = client.get_model_version_by_alias("registered", "best")
        assert version.run_id == best.user_attrs["mlflow_run_id"], (n_trials, best.number)
        assert "best model: models:/registered@best" in ran.stdout
        assert "INFO:" not in ran.stderr, "each line once, not again from the root logger's handler"
        parent, children = mlflow_runs(tracking, "registered")
        assert parent.data.tags["best_model_uri"] == "models:/registered@best"
        assert f"Best: trial-{best.number:04d} " in parent.data.tags["mlflow.note.content"]
    versions = client.search_model_versions("name = 'registered'")
    assert len(versions) == len({version.run_id for version in versions}), "a trial's model is registered once"
    best_run = client.get_run(version.run_id)
    assert registered_model_accuracy("models:/registered@best", tracking, data_dir) == pytest.approx(
        best_run.data.metrics["test_accuracy"], abs=1e-9)
    logged = [model for model in client.search_logged_models([best_run.info.experiment_id])
              if model.source_run_id == best_run.info.run_id]
    assert [model.artifact_location for model in logged] == [version.source], "logged once, the version's source"
    shown = cli(tmp_path, "study", "show", "registered", "--storage", sqlite_storage(tmp_path, "registered"))
    assert f"best model: models:/registered@best (version {version.version}, run {version.run_id})" in shown.stdout
    for run in children:  # the runs table reads without configuring columns
        number = int(run.data.tags["optuna.trial_number"])
        trial = study.trials[number]
        assert run.info.run_name.startswith(f"trial-{number:04d} hidden_size={trial.params['model_kwargs.hidden_size']}")
        assert run.info.status == "FINISHED" or trial.state == optuna.trial.TrialState.FAIL
        assert run.info.run_name.endswith(" [pruned]") == (trial.state == optuna.trial.TrialState.PRUNED)


@pytest.mark.slow
def test_train_register_moves_best_on_validation_alone_and_only_between_runs_validated_alike(
        tmp_path: Path, data_dir: Path) -> None:
    """Seeds 20 and 18 on 500 images rank one way on their 300 validation images (0.707 < 0.730) and the other way
    on the test set (0.715 > 0.691): ``best`` follows validation. A worse run leaves it; so does a run validated
    on other images, whose score does not compare."""
    common = ("train", "--epochs", "1", "--data-dir", str(data_dir), "--register", "digits", "--train-subset", "500")
    first = cli(tmp_path, *common, "--val-size", "300", "--seed", "20")
    assert "registered model models:/digits/1; 'best' moved to it: models:/digits@best" in first.stdout
    second = cli(tmp_path, *common, "--val-size", "300", "--seed", "18")
    assert "registered model models:/digits/2; 'best' moved to it" in second.stdout
    worse = cli(tmp_path, *common, "--val-size", "300", "--seed", "18", "--lr", "0.01")
    assert "registered model models:/digits/3; 'best' stays on a version with at least as high a final validation " \
           "accuracy" in worse.stdout
    other_split = cli(tmp_path, *common, "--val-size", "1000", "--seed", "18")
    assert "registered model models:/digits/4; 'best' stays: version 2 was validated on another split (val_size " \
           "300, this run's 1000), so the two do not compare" in other_split.stdout
    client = MlflowClient(sqlite_tracking(tmp_path))
    metrics = {version: client.get_run(client.get_model_version("digits", version).run_id).data.metrics
               for version in ("1", "2", "3")}
    assert metrics["2"]["val_accuracy"] > metrics["1"]["val_accuracy"] > metrics["3"]["val_accuracy"]
    assert metrics["2"]["test_accuracy"] < metrics["1"]["test_accuracy"], "the test set would have chosen 1"
    best = client.get_model_version_by_alias("digits", "best")
    assert str(best.version) == "2"
    assert registered_model_accuracy("models:/digits@best", sqlite_tracking(tmp_path), data_dir) == \
        pytest.approx(metrics["2"]["test_accuracy"], abs=1e-9)
    assert client.get_run(best.run_id).data.tags["sweepbench.registered_as"] == "models:/digits/2"


@pytest.mark.parametrize("args, message", [
    (["--register", "x", "--no-mlflow"], r"^sweepbench: error: --register: 'x' needs a name, MLflow logging"),
    (["--register", "x", "--seeds", "0,1"], r"^sweepbench: error: --register: 'x' needs a name"),
    (["--register", " "], r"^sweepbench: error: --register: ' ' needs a name"),
])
def test_train_register_refuses_what_it_cannot_register_in_one_line(tmp_path: Path, data_dir: Path, args: list[str],
                                                                    message: str) -> None:
    refused = cli(tmp_path, "train", "--data-dir", str(data_dir), *args, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and re.match(message, refused.stderr), refused.stderr
    assert list(tmp_path.iterdir()) == []


def test_study_dashboard_without_the_extra_says_how_to_install_it(tmp_path: Path, data_dir: Path) -> None:
    storage = tmp_path / "mlruns" / "studies"
    storage.mkdir(parents=True)
    optuna.create_study(study_name="shown", storage=f"sqlite:///{storage / 'shown.db'}")
    without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['optuna_dashboard'] = None; "
                              "from sweepbench.cli import main; sys.exit(main(['study', 'dashboard', 'shown']))"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert without.returncode == 2
    assert without.stderr.strip() == ('sweepbench: error: study dashboard: optuna-dashboard is not installed; '
                                      'pip install -e ".[dashboard]" (or pip install optuna-dashboard)')
    missing = cli(tmp_path, "study", "dashboard", "absent", check=False)
    assert missing.returncode == 2 and "study: no study 'absent'" in missing.stderr
