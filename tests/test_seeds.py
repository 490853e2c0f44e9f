"""``sweepbench train --seeds``: one run at several seeds, trained fused, each seed its own MLflow run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import run_cli

SETTINGS = ("--epochs", "2", "--train-subset", "3000", "--val-size", "1000", "--optimizer", "adam", "--lr", "0.003")


@pytest.mark.slow
def test_train_seeds_gives_one_run_per_seed_matching_solo_runs_and_their_spread(tmp_path: Path,
                                                                               data_dir: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ("train", *SETTINGS, "--data-dir", str(data_dir), "--tracking-uri", tracking, "--json")
    fused = run_cli(*common, "--seeds", "0,1,2", cwd=tmp_path)
    assert fused.returncode == 0, fused.stderr
    report = json.loads(fused.stdout)
    runs = report["runs"]
    assert [run["seed"] for run in runs] == [0, 1, 2] and {run["status"] for run in runs} == {"completed"}
    tests = [run["test_accuracy"] for run in runs]
    assert report["across_seeds"]["test_accuracy"]["mean"] == pytest.approx(statistics.fmean(tests))
    assert report["across_seeds"]["test_accuracy"]["std"] == pytest.approx(statistics.stdev(tests))
    assert "test_accuracy over 3 seeds: mean" in fused.stderr  # the text summary: stdout is the JSON alone

    solo = run_cli(*common, "--seed", "1", cwd=tmp_path)
    assert solo.returncode == 0, solo.stderr
    alone = json.loads(solo.stdout)
    assert alone["best_val_accuracy"] == pytest.approx(runs[1]["best_val_accuracy"], abs=0.002)
    assert alone["test_accuracy"] == pytest.approx(runs[1]["test_accuracy"], abs=0.002)

    client = MlflowClient(tracking)
    members = [client.get_run(run["mlflow_run_id"]) for run in runs]
    assert {run.data.tags["sweepbench.pack_id"] for run in members} == {members[0].data.tags["sweepbench.pack_id"]}
    assert len({run.data.tags["sweepbench.seed_group"] for run in members}) == 1
    assert [run.data.params["seed"] for run in members] == ["0", "1", "2"]
    for run in members:
        assert run.info.status == "FINISHED" and run.data.tags["sweepbench.kind"] == "train"
        assert run.data.tags["sweepbench.fused"] == "true" and run.data.tags["sweepbench.pack_size"] == "3"
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
