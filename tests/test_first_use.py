"""Concurrent first use of a fresh project: ``study run`` processes started at the same moment in an empty folder
share one MLflow SQLite store that none of them has created yet. MLflow creates and migrates its schema on first
use; unserialised, two processes doing it at once crash (5 of 5 tries before the lock in ``Store.client``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

N_TRIALS = 2
SPEC = f"""
model = "mnist_mlp"
dataset = "mnist"
[train]
epochs = 1
train_subset = 1000
val_size = 1000
device = "cpu"
[sampler]
name = "random"
[pruner]
name = "none"
[budget]
n_trials = {N_TRIALS}
[search.lr]
type = "float"
low = 1e-3
high = 1e-1
log = true
"""


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_study_runs_started_together_in_a_fresh_folder_all_succeed(tmp_path: Path, data_dir: Path,
                                                                    attempt: int) -> None:
    """Two processes on one study and a third on another study, all at once, all on the default store."""
    for name in ("first", "second"):
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\n{SPEC}')
    processes = [subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "study", "run", f"{name}.toml",
                                   "--data-dir", str(data_dir)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
                 for name in ("first", "first", "second")]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], "\n\n".join(outputs)
    for name in ("first", "second"):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/mlruns/studies/{name}.db")
        assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == N_TRIALS
        assert not study.get_trials(states=(TrialState.RUNNING,))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert runs and not [run.info.run_name for run in runs if run.info.status == "RUNNING"]
