"""Reports against one real store that mixes every kind of run, as users' stores do.

In one SQLite store and one experiment: two ``train`` runs of different lengths, a study (its parent run and
its trials, pruned ones included) and a benchmark (its parent run, its cells and their repeats); plus a ``train``
run in a second experiment. The same report is then read through a real ``mlflow server`` over HTTP.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from sweepbench.report import compare_runs, load_runs
from tests.conftest import mlflow_server, run_cli
from tests.test_report import markdown_rows
from tests.test_study import write_spec

EXPERIMENT = "mixed"  # the study's name: its runs share the experiment with the train and benchmark runs
TRAIN_ARGS = ("--model-arg", "hidden_size=32", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "256",
              "--device", "cpu")
BENCH = """
[benchmark]
name = "mixedbench"
description = "cpu fp32 against bf16 on a small MLP"
repeats = 2
[grid]
precisions = ["cpu/fp32", "cpu/bf16", "cuda/fp16"]
[defaults]
dataset = "mnist"
train_subset = 1500
val_size = 1000
epochs = 2
optimizer = "adadelta"
lr = 1.0
[[models]]
model = "mnist_mlp"
model_kwargs = { hidden_size = 32 }
"""


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("mixed-store")
    uri, data = sqlite_uri(folder), ("--data-dir", str(data_dir), "--tracking-uri", sqlite_uri(folder))
    for epochs, experiment in (("1", EXPERIMENT), ("2", EXPERIMENT), ("1", "other")):
        run_cli("train", *TRAIN_ARGS, "--epochs", epochs, "--experiment", experiment, *data, cwd=folder, check=True)
    run_cli("study", "run", str(write_spec(folder, EXPERIMENT, n_trials=6, epochs=3)), *data, cwd=folder, check=True)
    (folder / "mixedbench.toml").write_text(BENCH)
    run_cli("bench", "mixedbench.toml", "--experiment", EXPERIMENT, *data, cwd=folder, check=True)
    return folder, uri


def report_json(folder: Path, uri: str, *args: str) -> tuple[pd.DataFrame, str]:
    completed = run_cli("report", "--tracking-uri", uri, "--format", "json", *args, cwd=folder, check=True)
    return pd.DataFrame(json.loads(completed.stdout)), completed.stderr


def runs_by_kind(uri: str) -> dict[str, list]:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment_id], max_results=1000):
        runs.setdefault(run.data.tags["sweepbench.kind"], []).append(run)
    return runs


@pytest.mark.slow
def test_every_run_carries_its_kind_and_the_training_runs_one_schema(store):
    _, uri = store
    runs = runs_by_kind(uri)
    assert {kind: len(found) for kind, found in runs.items()} == {"train": 2, "study": 1, "trial": 6, "bench": 1,
                                                                  "cell": 3, "repeat": 4}
    training = runs["train"] + runs["trial"] + runs["repeat"]
    assert len({frozenset(run.data.params) for run in training}) == 1, "one set of params for every training run"
    experiment = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] == "cpu fp32 against bf16 on a small MLP"
    for run in training:
        assert {"model", "dataset", "device", "device_name", "precision", "optimizer", "batch_size",
                "epochs"} <= set(run.data.tags)
        assert {"train_loss", "val_accuracy", "epoch_seconds", "train_seconds"} <= set(run.data.metrics)


@pytest.mark.slow
def test_one_row_per_benchmark_cell_with_the_medians_of_its_repeats(store):
    folder, uri = store
    table, notes = report_json(folder, uri, "--experiment", EXPERIMENT, "--group-by", "model,precision",
                               "--baseline", "precision=fp32")
    runs = runs_by_kind(uri)
    assert "-" not in set(table["model"]) and set(table["model"]) == {"mnist_mlp"}
    assert table["runs"].sum() == len(runs["train"]) + len(runs["repeat"]) + sum(
        run.info.status == "FINISHED" and run.data.tags["status"] != "pruned" for run in runs["trial"]), \
        "no parent, cell or pruned run is a row or counted (pruned trials are FINISHED in MLflow: --status PRUNED)"
    cell_rows = table[table["train_subset"] == "1500"]
    assert sorted(cell_rows["precision"]) == ["bf16", "fp32"] and (cell_rows["runs"] == 2).all()
    for _, row in cell_rows.iterrows():
        repeats = [run for run in runs["repeat"] if run.data.tags["precision"] == row["precision"]]
        for metric in ("test_accuracy", "train_seconds"):
            expected = statistics.median(run.data.metrics[metric] for run in repeats)
            assert row[f"{metric}_median"] == pytest.approx(expected, rel=1e-12)
    fp32, bf16 = (cell_rows.set_index("precision").loc[name] for name in ("fp32", "bf16"))
    speedup = bf16["train_seconds_speedup"]
    assert math.isfinite(speedup) and speedup == pytest.approx(fp32["train_seconds_median"]
                                                               / bf16["train_seconds_median"])
    assert "note: baseline: precision=fp32 (as asked)" in notes


@pytest.mark.slow
def test_a_group_that_mixes_epoch_counts_is_split_and_named(store):
    folder, uri = store
    table, notes = report_json(folder, uri, "--experiment", EXPERIMENT, "--group-by", "model,optimizer")
    sgd = table[(table["optimizer"] == "sgd") & (table["train_subset"] == "None")]  # the two train runs
    assert sorted(sgd["epochs"]) == ["1", "2"] and (sgd["runs"] == 1).all()
    split = next(line for line in notes.splitlines() if line.startswith("note: rows split by"))
    assert "epochs" in split.split(":")[1]
    assert "rows pool runs that differ in lr, model_kwargs.hidden_size" in notes, "trials' own settings are named"


@pytest.mark.slow
def test_summaries_only_when_asked_and_pruned_trials_with_status(store):
    folder, uri = store
    summaries = load_runs(uri, [EXPERIMENT], kinds=("study", "bench", "cell"), status="all")
    assert sorted(summaries["kind"]) == ["bench", "cell", "cell", "cell", "study"]
    everything = load_runs(uri, [EXPERIMENT], status="all")
    assert set(everything["kind"]) == {"train", "trial", "repeat"}
    pruned = load_runs(uri, [EXPERIMENT], status="PRUNED")
    assert len(pruned) >= 1 and set(pruned["tags.status"]) == {"pruned"}, "the study pruned some trials"
    assert "pruned" not in set(load_runs(uri, [EXPERIMENT])["tags.status"]), "FINISHED rows trained to the end"
    table, _ = report_json(folder, uri, "--experiment", EXPERIMENT, "--status", "all", "--group-by", "kind,status",
                           "--metrics", "val_accuracy")
    assert set(table["kind"]) == {"train", "trial", "repeat"} and "PRUNED" in set(table["status"])


@pytest.mark.parametrize("status, names", [
    ("FINISHED", ["completed"]), ("PRUNED", ["pruned", "pruned before 2026-12"]), ("KILLED", ["killed"]),
    ("all", ["completed", "killed", "pruned", "pruned before 2026-12"])])
def test_a_pruned_run_is_pruned_to_reports_whether_finished_or_killed_as_before(tmp_path, status, names):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("statuses")
    for name, mlflow_status, tag in [("completed", "FINISHED", "completed"), ("pruned", "FINISHED", "pruned"),
                                     ("pruned before 2026-12", "KILLED", "pruned"), ("killed", "KILLED", "killed")]:
        run_id = client.create_run(experiment_id, run_name=name, tags={"status": tag}).info.run_id
        client.set_terminated(run_id, mlflow_status)
    assert sorted(load_runs(uri, ["statuses"], status=status)["run_name"]) == names


@pytest.mark.slow
def test_across_experiments_and_through_a_tracking_server_over_http(store, tmp_path):
    folder, uri = store
    across, _ = report_json(folder, uri, "--group-by", "experiment,kind", "--metrics", "test_accuracy")
    assert set(zip(across["experiment"], across["kind"])) == {("mixed", "train"), ("mixed", "trial"),
                                                              ("mixed", "repeat"), ("other", "train")}
    args = ("--experiment", EXPERIMENT, "--group-by", "model,precision", "--baseline", "precision=fp32")
    local, local_notes = report_json(folder, uri, *args)
    with mlflow_server(tmp_path, backend_uri=uri) as server:
        remote, remote_notes = report_json(folder, server, *args)
    pd.testing.assert_frame_equal(remote, local)
    assert remote_notes == local_notes


@pytest.mark.slow
def test_html_is_a_styled_page_with_the_notes_and_no_nan(store, tmp_path):
    folder, uri = store
    output = tmp_path / "report.html"
    run_cli("report", "--tracking-uri", uri, "--experiment", EXPERIMENT, "--group-by", "model,precision",
            "--output", str(output), "--plot", str(tmp_path / "charts"), cwd=folder, check=True)
    page = output.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and '<table id="T_sweepbench">' in page
    box = page[page.index('<div class="scroll">'):]
    assert box.index('<table id="T_sweepbench">') < box.index("</div>"), "a wide table scrolls in its own box"
    assert "#T_sweepbench td.col" in page and "text-align: right" in page, "pandas' Styler aligns the numbers"
    assert page.count('<img src="data:image/png;base64,') == len(list((tmp_path / "charts").glob("*.png"))) == 2
    text = re.sub(r'<img src="data:image/png;base64,[^"]*"', "", page)  # base64 may spell anything
    assert "nan" not in text.lower() and "baseline: precision=fp32 (the default rule)" in page
    assert "95% confidence interval of the mean" in page and "rows split by" in page


@pytest.mark.slow
def test_the_default_table_is_compact_and_a_report_over_experiments_says_which_each_row_is(store):
    folder, uri = store
    completed = run_cli("report", "--tracking-uri", uri, "--group-by", "model", cwd=folder, check=True)
    rows = markdown_rows(completed.stdout)
    header = list(rows[0])  # the keys (split by what differs inside a group), then the compact figures
    assert header[:2] == ["experiment", "model"] and header[header.index("runs"):] == [
        "runs", "test_accuracy_median", "test_accuracy_ci95_low", "test_accuracy_ci95_high", "train_seconds_median",
        "train_seconds_speedup"]
    assert {row["experiment"] for row in rows} == {EXPERIMENT, "other"}
    assert "note: rows by experiment: the runs come from 2 experiments" in completed.stderr
    every, _ = report_json(folder, uri, "--group-by", "model")
    assert {"best_val_accuracy_median", "peak_memory_mb_range", "samples_per_second_ci95_high"} <= set(every)
    asked = run_cli("report", "--tracking-uri", uri, "--group-by", "model", "--metrics", "val_accuracy",
                    cwd=folder, check=True)
    asked_header = list(markdown_rows(asked.stdout)[0])
    assert asked_header[asked_header.index("runs"):] == ["runs", "val_accuracy_median", "val_accuracy_range",
                                                         "val_accuracy_ci95_low", "val_accuracy_ci95_high"]


def test_old_stores_without_kind_tags_are_read_by_the_tags_their_writers_set(tmp_path):
    """Runs as the benchmark wrote them before the run schema: the parent tagged ``benchmark``, the cell
    ``benchmark_cell`` with ``model`` as a tag, the repeats with ``model`` only as a param."""
    uri = sqlite_uri(tmp_path)
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("old")
    parent = client.create_run(experiment_id, tags={"benchmark": "old"}).info.run_id
    cell = client.create_run(experiment_id, tags={"benchmark_cell": "mlp", "model": "mnist_mlp",
                                                  "mlflow.parentRunId": parent}).info.run_id
    for seconds in (2.0, 4.0):
        run = client.create_run(experiment_id, tags={"repeat": "1", "precision": "fp32", "device": "cpu",
                                                     "mlflow.parentRunId": cell}).info.run_id
        client.log_param(run, "model", "mnist_mlp")
        client.log_metric(run, "train_seconds", seconds)
    for run_id in (parent, cell):
        client.log_metric(run_id, "train_seconds", 100.0)
    runs = load_runs(uri, ["old"], status="all")
    assert sorted(runs["kind"]) == ["repeat", "repeat"]
    table = compare_runs(runs, ["model", "precision"], ["train_seconds"]).table
    assert table[["model", "runs", "train_seconds_median"]].values.tolist() == [["mnist_mlp", 2, 3.0]]
    assert sorted(load_runs(uri, ["old"], status="all", kinds=("bench", "cell"))["kind"]) == ["bench", "cell"]


@pytest.mark.slow
def test_study_show_counts_what_it_leaves_out_and_export_has_clean_columns(store):
    folder, _ = store
    shown = run_cli("study", "show", "mixed", "--limit", "2", cwd=folder, check=True).stdout
    assert "... and 4 more trial(s) not shown (--limit 0 shows all)" in shown
    every = run_cli("study", "show", "mixed", "--limit", "0", cwd=folder, check=True).stdout
    assert "more trial(s) not shown" not in every
    table = pd.read_csv(io.StringIO(run_cli("study", "export", "mixed", "--format", "csv", cwd=folder,
                                            check=True).stdout))
    assert not [column for column in table.columns if column.startswith("system_attrs")]
    assert table["duration_seconds"].dtype == float and (table["duration_seconds"] > 0).all()
    assert {"number", "state", "params_lr", "params_model_kwargs.hidden_size"} <= set(table.columns)
