"""The views users open first, rendered in a real browser from runs the real CLI made: the runs table's Dataset
column, a run's System metrics tab, the registered model's page with its alias, and optuna-dashboard on a study.
Each page is checked against what MlflowClient or Optuna holds for the same record.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with the reason without it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import optuna
import pytest
from mlflow import MlflowClient

from sweepbench.tracking import experiment_url, stop_process_group
from tests.conftest import CHROMIUM, free_port, mlflow_server, render, run_cli, wait_for_http

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")]

STUDY = "mnist_mlp_quick"
SMALL = ("--model-arg", "hidden_size=32", "--epochs", "2", "--train-subset", "5000", "--device", "cpu")


class Project(NamedTuple):
    folder: Path
    tracking_uri: str
    base_url: str
    train_run_id: str


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Project]:
    """A fresh project folder with a registered ``train`` run and a 3-trial study, behind ``mlflow server``."""
    folder = tmp_path_factory.mktemp("views")
    env = {"MLFLOW_TRACKING_URI": ""}
    trained = run_cli("train", *SMALL, "--register", "views-demo", "--json", "--data-dir", str(data_dir),
                      cwd=folder, env=env, check=True)
    run_cli("study", "run", str(Path(__file__).parents[1] / "studies" / f"{STUDY}.toml"), "--n-trials", "3",
            "--set", "epochs=2", "--set", "train_subset=5000", "--data-dir", str(data_dir), cwd=folder, env=env,
            check=True)
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with mlflow_server(folder, uri) as base_url:
        yield Project(folder, uri, base_url, json.loads(trained.stdout)["mlflow_run_id"])


def test_the_runs_table_shows_each_split_in_its_dataset_column(project: Project, tmp_path: Path) -> None:
    client = MlflowClient(project.tracking_uri)
    run = client.get_run(project.train_run_id)
    text = render(experiment_url(project.base_url, run.info.experiment_id), tmp_path / "runs.png")
    for item in run.inputs.dataset_inputs:
        context = next(tag.value for tag in item.tags if tag.key == "mlflow.data.context")
        shown = f"{item.dataset.name} ({item.dataset.digest}) {context}"
        assert shown in text, f"{shown!r} not in the runs table; see {tmp_path / 'runs.png'}\n{text[:1500]}"


def test_a_runs_system_metrics_tab_has_a_chart_for_each_system_metric(project: Project, tmp_path: Path) -> None:
    client = MlflowClient(project.tracking_uri)
    run = client.get_run(project.train_run_id)
    logged = [name for name in run.data.metrics if name.startswith("system/")]
    assert "system/cpu_utilization_percentage" in logged
    url = (f"{project.base_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/system-metrics"
           "?workflowType=machine_learning")
    text = render(url, tmp_path / "system.png")
    assert f"System metrics ({len(logged)})" in text, f"see {tmp_path / 'system.png'}\n{text[:1500]}"


def test_the_registered_models_page_lists_its_version_with_the_best_alias(project: Project, tmp_path: Path) -> None:
    client = MlflowClient(project.tracking_uri)
    best = client.get_model_version_by_alias("views-demo", "best")
    assert best.run_id == project.train_run_id
    text = render(f"{project.base_url}/#/models/views-demo", tmp_path / "model.png")
    assert re.search(rf"Version {best.version} .*@ best", text), f"see {tmp_path / 'model.png'}\n{text[:1500]}"
    study_best = client.get_model_version_by_alias(STUDY, "best")
    text = render(f"{project.base_url}/#/models/{STUDY}", tmp_path / "study-model.png")
    assert re.search(rf"Version {study_best.version} .*@ best", text), text[:1500]


def test_study_dashboard_serves_the_study_with_its_history_plot(project: Project, tmp_path: Path) -> None:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{project.folder / 'mlruns/studies' / STUDY}.db")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "study", "dashboard", STUDY, "--port",
                                str(port)], cwd=project.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}"
        wait_for_http(url, process, timeout=60)
        text = render(url, tmp_path / "dashboard.png")
    finally:
        stop_process_group(process)
    assert f"{STUDY} (id={study._study_id})" in text and "History" in text
    assert f"Best Trial (number={study.best_trial.number}) {study.best_value!r}" in text, text[:1500]
    assert "Trial val_accuracy" in text, "the history plot's axes are drawn"
