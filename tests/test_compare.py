"""The sampler comparison (``study compare``, ``study compare-report``) on real MNIST with real stores: pairing
across samplers, the member studies under one comparison run, a kill and resume that ends every study at exactly
N, a report rebuilt from the stores alone, and bad input refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import run_cli
from tests.test_study import assert_exactly, sqlite_tracking, start_cli, wait_for_running_trial
from sweepbench.compare.results import load_member
from sweepbench.compare.run import SPEC_ARTIFACT, find_comparison_run, render, report_from_store, run_comparison
from sweepbench.compare.spec import load_comparison
from sweepbench.tracking import Store

SPEC = """
name = "{name}"
model = "mnist_mlp"
dataset = "mnist"
[train]
epochs = 1
train_subset = 1500
val_size = 1000
batch_size = 128
optimizer = "sgd"
model_kwargs = {{ hidden_size = 32 }}
device = "cpu"
[sampler]
seed = 7
n_startup_trials = 2
[pruner]
name = "none"
[budget]
n_trials = {n_trials}
[compare]
samplers = {samplers}
seeds = {seeds}
[search.lr]
type = "float"
low = 1e-4
high = 1.0
log = true
[search.momentum]
type = "float"
low = 0.0
high = 0.95
"""


def write_comparison(directory: Path, name: str, n_trials: int = 4, samplers: str = '["tpe", "random"]',
                     seeds: int = 2, extra: str = "") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(SPEC.format(name=name, n_trials=n_trials, samplers=samplers, seeds=seeds) + extra)
    return path


def compare_args(spec: Path, data_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("study", "compare", str(spec), "--data-dir", str(data_dir), *extra)


def member_counts(directory: Path, name: str) -> dict[str, int]:
    """Study name -> finished trials, for every member study in the run's default storage."""
    comparison = load_comparison(directory / f"{name}.toml")
    counts = {}
    for sampler, seed in comparison.members():
        study = load_member(comparison, sampler, seed, None)
        assert study is not None, (sampler, seed)
        assert_exactly(study, comparison.study.target_trials())
        counts[study.study_name] = len(study.trials)
    return counts


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, object]:
    """One comparison, TPE against random search over 2 seeds of 4 trials, run in this process."""
    directory = tmp_path_factory.mktemp("compared")
    spec = write_comparison(directory, "paired")
    comparison = load_comparison(spec)
    comparison = dataclasses.replace(comparison, study=comparison.study.with_overrides(data_dir=str(data_dir)))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        outcome = run_comparison(comparison, spec.read_text(), tracking_uri=sqlite_tracking(directory))
    return directory, outcome


def test_seed_s_gives_every_sampler_the_same_random_start_and_training_seed(compared) -> None:
    directory, outcome = compared
    comparison = outcome.comparison
    assert comparison.seeds == (7, 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        studies = {(sampler, seed): load_member(comparison, sampler, seed, None)
                   for sampler, seed in comparison.members()}
    startup = comparison.study.sampler_startup_trials
    for seed in comparison.seeds:
        tpe, random = studies["tpe", seed], studies["random", seed]
        assert [trial.params for trial in tpe.trials[:startup]] == [trial.params for trial in random.trials[:startup]]
    assert studies["random", 7].trials[0].params != studies["random", 8].trials[0].params
    tpe_trials, random_trials = studies["tpe", 7].trials, studies["random", 7].trials
    assert [trial.params for trial in tpe_trials] != [trial.params for trial in random_trials], "TPE took over"
    client = MlflowClient(sqlite_tracking(directory))
    for (sampler, seed), study in studies.items():
        assert_exactly(study, 4)
        run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
        assert run.data.params["seed"] == str(seed), "every trial of seed s trains with seed s"


def test_member_studies_are_children_of_one_comparison_run_which_holds_the_report(compared) -> None:
    directory, outcome = compared
    client = MlflowClient(sqlite_tracking(directory))
    experiment = client.get_experiment_by_name("paired")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    kinds = sorted(run.data.tags["sweepbench.kind"] for run in runs)
    assert kinds == ["comparison"] + ["study"] * 4 + ["trial"] * 16
    studies = [run for run in runs if run.data.tags["sweepbench.kind"] == "study"]
    assert {run.data.tags["mlflow.parentRunId"] for run in studies} == {outcome.run_id}
    assert {run.data.params["sampler"] for run in studies} == {"tpe", "random"}
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and outcome.status == "FINISHED"
    assert parent.data.params["samplers"] == "tpe,random" and parent.data.params["seeds"] == "7,8"
    artifacts = {item.path for item in client.list_artifacts(outcome.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.json", "comparison.html", "curves.png"} <= artifacts
    assert parent.data.tags["conclusion"] == outcome.report.conclusion
    assert "needs at least 6 pairs" in outcome.report.conclusion, "two seeds cannot tell samplers apart"
    table = outcome.report.table.set_index("sampler")
    assert sorted(table.index) == ["random", "tpe"] and (table["seeds"] == 2).all()
    assert (table["final_best_ci_low"] <= table["final_best_iqm"]).all()
    assert (table["final_best_iqm"] <= table["final_best_ci_high"]).all()


def test_the_report_rebuilt_from_the_stores_alone_is_the_one_logged(compared) -> None:
    directory, outcome = compared
    logged = Path(MlflowClient(sqlite_tracking(directory)).download_artifacts(
        outcome.run_id, "comparison.md", str(directory / "downloaded")))
    rebuilt = run_cli("study", "compare-report", "paired", "--tracking-uri", sqlite_tracking(directory),
                      "--curves", "again/curves.png", cwd=directory)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == logged.read_text().strip()
    assert (directory / "again" / "curves.png").stat().st_size > 10_000
    as_json = run_cli("study", "compare-report", "paired", "--tracking-uri", sqlite_tracking(directory),
                      "--format", "json", cwd=directory)
    rows = json.loads(as_json.stdout)
    assert [row["sampler"] for row in rows] == list(outcome.report.table["sampler"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        report, _ = report_from_store("paired", sqlite_tracking(directory), None)
    assert render(report, "csv") == render(outcome.report, "csv")
    store = Store(sqlite_tracking(directory))
    assert find_comparison_run(store, "paired").info.run_id == outcome.run_id
    assert SPEC_ARTIFACT in {f"spec/{item.path.rsplit('/', 1)[-1]}"
                             for item in store.client.list_artifacts(outcome.run_id, "spec")}


def test_a_rerun_with_another_plan_is_refused_in_one_line(compared, data_dir: Path) -> None:
    directory, _ = compared
    before = sorted(path.name for path in (directory / "mlruns" / "studies").iterdir())
    rerun = run_cli(*compare_args(directory / "paired.toml", data_dir, "--seeds", "3", "--tracking-uri",
                                  sqlite_tracking(directory)), cwd=directory)
    assert rerun.returncode == 2, rerun.stdout + rerun.stderr
    error = [line for line in rerun.stderr.splitlines() if line.startswith("sweepbench: error:")]
    assert len(error) == 1 and "seeds '7,8' (now '7,8,9')" in error[0], rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert sorted(path.name for path in (directory / "mlruns" / "studies").iterdir()) == before


BAD_COMPARISONS = {
    "one sampler": ({"samplers": '["tpe"]'}, "compare.samplers: expected at least two samplers"),
    "unknown sampler": ({"samplers": '["tpe", "annealing"]'}, "compare.samplers: 'annealing' is not allowed"),
    "grid is not compared": ({"samplers": '["tpe", "grid"]'}, "compare.samplers: 'grid' is not allowed"),
    "a sampler twice": ({"samplers": '["tpe", "tpe"]'}, "names a sampler twice"),
    "one seed": ({"seeds": 1}, "compare.seeds: 1 is out of range"),
    "seeds not a number": ({"seeds": '"ten"'}, "compare.seeds"),
    "unknown key": ({"extra": "[compare.more]\n"}, "compare: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_COMPARISONS))
def test_a_bad_comparison_is_one_line_exit_2_and_creates_nothing(tmp_path: Path, data_dir: Path, case: str) -> None:
    settings, message = BAD_COMPARISONS[case]
    extra = settings.pop("extra", "")
    spec = write_comparison(tmp_path, "bad", **settings)
    if extra:
        spec.write_text(spec.read_text().replace("[search.lr]", extra + "[search.lr]"))
    completed = run_cli(*compare_args(spec, data_dir), cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.toml"]


def test_compare_report_of_a_comparison_that_is_not_there_is_one_line(compared) -> None:
    directory, _ = compared
    completed = run_cli("study", "compare-report", "nothere", "--tracking-uri", sqlite_tracking(directory),
                        cwd=directory)
    assert completed.returncode == 2 and "no comparison 'nothere'" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_killed_comparison_resumes_and_ends_with_every_study_at_exactly_n(tmp_path: Path, data_dir: Path) -> None:
    spec = write_comparison(tmp_path, "killedcmp", n_trials=5)
    args = compare_args(spec, data_dir, "--heartbeat-interval", "1")
    process = start_cli(args, tmp_path)
    wait_for_running_trial(tmp_path, "killedcmp.random.seed7", process)
    process.kill()
    process.communicate()
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        counts = member_counts(tmp_path, "killedcmp")
    assert counts["killedcmp.random.seed7"] > 5, "the killed trial failed and was queued again"
    client = MlflowClient(sqlite_tracking(tmp_path))
    experiment = client.get_experiment_by_name("killedcmp")
    comparisons = client.search_runs([experiment.experiment_id], "tags.`sweepbench.kind` = 'comparison'")
    assert len(comparisons) == 1 and comparisons[0].info.status == "FINISHED"
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert "already at 5 finished trials" in resumed.stderr, "the first member was not run again"
