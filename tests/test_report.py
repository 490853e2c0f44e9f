"""Comparison reports over real runs in a real SQLite store, read back through MLflow's API."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from sweepbench.config import ConfigError, RunConfig
from sweepbench.engine import train
from sweepbench.report import compare_runs, export_table, load_runs, parse_baseline
from sweepbench.tracking import MlflowLogger
from tests.conftest import run_cli

EXPERIMENT = "report-test"
GROUP_BY = ["optimizer", "batch_size"]
RUN_SETTINGS = [
    dict(optimizer="sgd", lr=0.05, seed=0), dict(optimizer="sgd", lr=0.05, seed=1),
    dict(optimizer="adam", lr=0.001, seed=0), dict(optimizer="adam", lr=0.001, seed=1),
    dict(optimizer="sgd", lr=0.05, seed=0, batch_size=128),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir) -> str:
    """Five finished runs (two optimizers x two seeds, one larger batch) and one diverged run."""
    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    for settings in RUN_SETTINGS + [dict(optimizer="sgd", lr=1e6, seed=0)]:
        config = RunConfig(data_dir=str(data_dir), model_kwargs={"hidden_size": 32}, train_subset=2000, epochs=1,
                           device="auto", **settings)
        train(config, [MlflowLogger(EXPERIMENT, uri, log_artifacts=False)])
    return uri


@pytest.fixture(scope="module")
def runs(store) -> pd.DataFrame:
    return load_runs(store, [EXPERIMENT])


def comparison_table(runs: pd.DataFrame, *args, **kwargs) -> pd.DataFrame:
    return compare_runs(runs, *args, **kwargs).table


def medians(runs: pd.DataFrame, metric: str, **keys: str) -> float:
    selected = runs
    for key, value in keys.items():
        selected = selected[selected[f"params.{key}"] == value]
    return float(np.median(selected[f"metrics.{metric}"]))


def test_runs_are_read_with_params_tags_and_metrics_and_only_finished_by_default(store, runs):
    assert len(runs) == len(RUN_SETTINGS) and set(runs["status"]) == {"FINISHED"}
    assert set(runs["params.device"]) == {"auto"} and set(runs["tags.device"]) == {"cpu"}
    assert len(load_runs(store, [EXPERIMENT], status="all")) == len(RUN_SETTINGS) + 1
    assert set(load_runs(store, [EXPERIMENT], status="FAILED")["tags.status"]) == {"diverged"}
    adam = load_runs(store, [EXPERIMENT], filter_string="params.optimizer = 'adam'")
    assert set(adam["params.optimizer"]) == {"adam"} and len(adam) == 2


def test_groups_aggregate_medians_and_spread_across_seeds(runs):
    table = comparison_table(runs, ["model", "dataset", "device", "optimizer"], ["test_accuracy"], spread="range")
    adam = table[table["optimizer"] == "adam"].iloc[0]
    values = runs.loc[runs["params.optimizer"] == "adam", "metrics.test_accuracy"]
    assert (adam["device"], adam["runs"]) == ("cpu", 2)
    assert adam["test_accuracy_median"] == np.median(values)
    assert adam["test_accuracy_range"] == values.max() - values.min()
    for spread, expected in (("std", values.std()), ("iqr", values.quantile(0.75) - values.quantile(0.25))):
        row = comparison_table(runs, ["optimizer"], ["test_accuracy"], spread=spread).iloc[0]
        assert row[f"test_accuracy_{spread}"] == pytest.approx(expected, rel=1e-12)


def test_speedups_compare_each_row_with_the_baseline_that_shares_its_other_keys(runs):
    table = comparison_table(runs, GROUP_BY, ["train_seconds", "samples_per_second"],
                             baseline=parse_baseline("optimizer=sgd"))
    row = table.set_index(["optimizer", "batch_size"])
    sgd, adam = ("sgd", "64"), ("adam", "64")
    assert row.loc[sgd, "train_seconds_speedup"] == 1 and row.loc[("sgd", "128"), "train_seconds_speedup"] == 1
    assert row.loc[adam, "train_seconds_speedup"] == (row.loc[sgd, "train_seconds_median"]
                                                      / row.loc[adam, "train_seconds_median"])
    assert row.loc[adam, "samples_per_second_speedup"] == (row.loc[adam, "samples_per_second_median"]
                                                           / row.loc[sgd, "samples_per_second_median"])
    unnamed = compare_runs(runs, GROUP_BY, ["train_seconds"])
    assert "train_seconds_speedup" not in unnamed.table.columns and unnamed.baseline is None
    assert any(note.startswith("no speed-ups: the default baseline") for note in unnamed.notes)


def test_bad_selections_are_errors_that_name_the_choices(store, runs):
    with pytest.raises(ConfigError, match="no param, tag or metric named 'colour'.*optimizer"):
        comparison_table(runs, ["colour"])
    with pytest.raises(ConfigError, match="baseline: no group matches.*optimizer: adam, sgd"):
        comparison_table(runs, GROUP_BY, baseline={"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="not among the group-by keys"):
        comparison_table(runs, GROUP_BY, baseline={"precision": "fp32"})
    with pytest.raises(ConfigError, match="metric: 'f1' not logged.*test_accuracy"):
        comparison_table(runs, GROUP_BY, ["f1"])
    with pytest.raises(ConfigError, match="kind: 'trials' is not allowed; choose one of: train, trial, repeat, study"):
        load_runs(store, [EXPERIMENT], kinds=("trials",))
    with pytest.raises(ConfigError, match=f"experiment: \\['nope'\\] not found.*{EXPERIMENT}"):
        load_runs(store, ["nope"])
    with pytest.raises(ConfigError, match="no runs match"):
        comparison_table(load_runs(store, [EXPERIMENT], filter_string="params.optimizer = 'rmsprop'"))


def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.slow
def test_report_md_prints_the_grouped_table_with_medians_and_speedups(store, runs, tmp_path):
    completed = run_cli("report", "--tracking-uri", store, "--experiment", EXPERIMENT, "--group-by",
                        ",".join(GROUP_BY), "--baseline", "optimizer=sgd", "--format", "md", "--plot",
                        str(tmp_path / "charts"), cwd=tmp_path, check=True)
    rows = {(row["optimizer"], row["batch_size"]): row for row in markdown_rows(completed.stdout)}
    assert set(rows) == {("adam", "64"), ("sgd", "64"), ("sgd", "128")}
    adam = rows[("adam", "64")]
    assert adam["runs"] == "2"
    assert float(adam["test_accuracy_median"]) == float(f"{medians(runs, 'test_accuracy', optimizer='adam'):.4g}")
    expected_speedup = (medians(runs, "train_seconds", optimizer="sgd", batch_size="64")
                        / medians(runs, "train_seconds", optimizer="adam"))
    assert float(adam["train_seconds_speedup"]) == float(f"{expected_speedup:.4g}")
    assert rows[("sgd", "64")]["train_seconds_speedup"] == "1"
    for chart in ("accuracy_vs_time.png", "speedup.png"):
        assert (tmp_path / "charts" / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_csv_and_json_exports_parse_back_to_the_same_numbers(store, runs, tmp_path):
    expected = comparison_table(runs, GROUP_BY, baseline={"optimizer": "sgd"})
    numbers = expected.select_dtypes("number").columns
    completed = run_cli("report", "--tracking-uri", store, "--experiment", EXPERIMENT, "--group-by",
                        ",".join(GROUP_BY), "--baseline", "optimizer=sgd", "--output", str(tmp_path / "table.csv"),
                        cwd=tmp_path, check=True)
    assert "wrote" in completed.stderr
    from_csv = pd.read_csv(tmp_path / "table.csv")
    from_json = pd.DataFrame(json.loads(export_table(expected, "json")))
    for parsed in (from_csv, from_json):
        assert list(parsed.columns) == list(expected.columns)
        pd.testing.assert_frame_equal(parsed[numbers].astype(float), expected[numbers].astype(float),
                                      check_exact=True)
        assert parsed[GROUP_BY].astype(str).equals(expected[GROUP_BY])
    assert from_csv.equals(pd.read_csv(io.StringIO(export_table(expected, "csv"))))


def test_html_and_latex_exports_hold_every_group(runs):
    table = comparison_table(runs, GROUP_BY, ["test_accuracy"])
    html, latex = export_table(table, "html"), export_table(table, "latex")
    assert html.startswith("<!DOCTYPE html>") and '<table id="T_sweepbench">' in html and "nan" not in html.lower()
    assert html == export_table(table, "html"), "the same table is the same page"
    assert latex.lstrip().startswith("\\begin{tabular}")
    for text in (html, latex):
        assert "adam" in text and "128" in text and "test" in text
    with pytest.raises(ConfigError, match="format: 'xls' is not allowed"):
        export_table(table, "xls")


@pytest.mark.slow
def test_report_cli_states_a_bad_key_in_one_line(store, tmp_path):
    completed = run_cli("report", "--tracking-uri", store, "--group-by", "colour", cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.startswith("sweepbench: error: no param, tag or metric named 'colour'")
    assert not (tmp_path / "mlruns").exists()
