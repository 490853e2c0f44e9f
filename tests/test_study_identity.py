"""A study is one search space: a rerun whose spec changed its space, objective or fixed settings is refused in one
line naming the change (or continued on purpose as the next spec version), while a comment, key order or budget
changes nothing. Fuzzed over spec edits; checked end to end on real MNIST with the real CLI and stores."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from sweepbench.study.identity import VERSION_ATTR, VERSION_TAG, changes, fingerprint, identity
from sweepbench.study.job import max_workers
from sweepbench.study.spec import parse_spec
from tests.conftest import SHARED_DATA, assert_refused, run_cli
from tests.test_bad_input import npz, with_label

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BASE = {
    "name": "ident",
    "model": "mnist_mlp",
    "dataset": "mnist",
    "description": "identity test",
    "train": {"epochs": 1, "train_subset": 1000, "val_size": 500, "device": "cpu", "seed": 0},
    "sampler": {"name": "random", "seed": 3},
    "budget": {"n_trials": 2},
    "objective": {"metric": "val_accuracy"},
    "search": {
        "lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        "model_kwargs.hidden_size": {"type": "int", "low": 16, "high": 48, "step": 16},
        "optimizer": {"type": "categorical", "choices": ["adadelta", "adam"]},
    },
}


def render(document: dict, order: random.Random | None = None, comments: bool = False) -> str:
    """``document`` as TOML text; ``order`` shuffles the keys of every table, ``comments`` adds comment lines
    and trailing comments. The subset of TOML specs use: scalars, arrays of scalars, nested tables."""
    lines: list[str] = []

    def keys(table: dict) -> list[str]:
        names = list(table)
        if order:
            order.shuffle(names)
        return names

    def emit(path: list[str], table: dict, header: str = "[{}]") -> None:
        if path:
            lines.append(header.format(".".join(_key(part) for part in path)) + ("  # a table" if comments else ""))
        for key in keys(table):
            if not isinstance(table[key], dict) and not _tables(table[key]):
                if comments:
                    lines.append(f"# about {key}")
                lines.append(f"{_key(key)} = {_value(table[key])}")
        for key in keys(table):
            if isinstance(table[key], dict):
                emit([*path, key], table[key])
            for item in _tables(table[key]):
                emit([*path, key], item, "[[{}]]")

    emit([], document)
    return "\n".join(lines) + "\n"


def _tables(value) -> list[dict]:
    """An array of tables (``[[objective]]``), else nothing."""
    return value if isinstance(value, list) and value and all(isinstance(item, dict) for item in value) else []


def _key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else f'"{key}"'


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return repr(value)


def parsed(document: dict, **render_options):
    return parse_spec(tomllib.loads(render(document, **render_options)), "spec.toml")


def edited(change) -> dict:
    document = _copy(BASE)
    change(document)
    return document


def _copy(value):
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return list(value) if isinstance(value, list) else value


def _set(path: str, value):
    def change(document: dict) -> None:
        *tables, last = path.split("/")
        target = document
        for table in tables:
            target = target.setdefault(table, {})
        target[last] = value
    return change


def _delete(path: str):
    def change(document: dict) -> None:
        *tables, last = path.split("/")
        target = document
        for table in tables:
            target = target[table]
        del target[last]
    return change


IDENTITY_CHANGES = {  # what the edit does: (edit, what the refusal names, the setting it touches)
    "narrowed range": (_set("search/lr/high", 0.5), r"search\.lr\.high 1 -> 0\.5", "lr"),
    "log off": (_set("search/lr/log", False), r"search\.lr\.log true -> false", "lr"),
    "a step added": (_set("search/lr", {"type": "float", "low": 0.01, "high": 1.0, "step": 0.01}),
                     r"search\.lr\.step added \(0\.01\)", "lr"),
    "another step": (_set("search/model_kwargs.hidden_size/step", 8),
                     r"search\.model_kwargs\.hidden_size\.step 16 -> 8", "hidden_size"),
    "int becomes categorical": (_set("search/model_kwargs.hidden_size", {"type": "categorical",
                                                                          "choices": [16, 32, 48]}),
                                r'search\.model_kwargs\.hidden_size\.type "int" -> "categorical"', "hidden_size"),
    "added parameter": (_set("search/batch_size", {"type": "int", "low": 32, "high": 128}),
                        r"search\.batch_size added", "batch_size"),
    "removed parameter": (_delete("search/optimizer"), r"search\.optimizer removed", "optimizer"),
    "one more choice": (_set("search/optimizer/choices", ["adadelta", "adam", "sgd"]),
                        r'search\.optimizer\.choices \["adadelta", "adam"\] -> \["adadelta", "adam", "sgd"\]',
                        "optimizer"),
    "choices reordered": (_set("search/optimizer/choices", ["adam", "adadelta"]), r"search\.optimizer\.choices",
                          "optimizer"),
    "objective metric": (_set("objective", {"metric": "val_loss"}),
                         r'objective\[0\]\.metric "val_accuracy" -> "val_loss"', "objective"),
    "objective added": (_set("objective", [{"metric": "val_accuracy"}, {"metric": "train_seconds"}]),
                        r"objective\[1\]\.metric added \(\"train_seconds\"\)", "objective"),
    "more epochs": (_set("train/epochs", 2), r"train\.epochs 1 -> 2", "epochs"),
    "another seed": (_set("train/seed", 1), r"train\.seed 0 -> 1", "seed"),
    "another device": (_set("train/device", "auto"), r'train\.device "cpu" -> "auto"', "device"),
    "a fixed setting added": (_set("train/weight_decay", 0.001), r"train\.weight_decay 0 -> 0\.001",
                              "weight_decay"),
    "a model argument fixed": (_set("train/model_kwargs", {"dropout": 0.25}),
                               r"train\.model_kwargs\.dropout added \(0\.25\)", "model_kwargs"),
    "another dataset": (_set("dataset", "fashion_mnist"), r'train\.dataset "mnist" -> "fashion_mnist"', "dataset"),
    "a compiled step": (_set("train/step", "compiled"), r'train\.step added \("compiled"\)', "step"),
}

NOT_IDENTITY = {  # edits that leave the study's identity alone: (edit, the setting it touches)
    "more trials": (_set("budget/n_trials", 50), "n_trials"),
    "a timeout": (_set("budget/timeout", 600.0), "timeout"),
    "another sampler": (_set("sampler", {"name": "tpe", "seed": 9}), "sampler"),
    "another pruner": (_set("pruner", {"name": "none"}), "pruner"),
    "a description": (_set("description", "another text"), "description"),
    "a data folder": (_set("train/data_dir", "/elsewhere"), "data_dir"),
    "a checkpoint folder": (_set("train/checkpoint_dir", "/elsewhere/checkpoints"), "checkpoint_dir"),
    "an integral float": (_set("search/lr/high", 1), "lr"),
    "another spelling": (_set("search/lr/low", 1e-2), "lr"),
    "a default made explicit": (_set("train/batch_size", 64), "batch_size"),
    # a setting added to RunConfig later, at its default: studies recorded before it resume as they were
    "the eager step made explicit": (_set("train/step", "eager"), "step"),
}


@pytest.mark.parametrize("case", sorted(IDENTITY_CHANGES))
def test_each_change_to_the_space_objective_or_fixed_settings_is_named(case: str) -> None:
    change, named, _ = IDENTITY_CHANGES[case]
    before, after = parsed(BASE), parsed(edited(change))
    assert fingerprint(before) != fingerprint(after)
    described = "; ".join(changes(identity(before), identity(after)))
    assert re.search(named, described), described


@pytest.mark.parametrize("case", sorted(NOT_IDENTITY))
def test_budget_sampler_places_and_spelling_are_not_identity(case: str) -> None:
    assert identity(parsed(edited(NOT_IDENTITY[case][0]))) == identity(parsed(BASE))


EDITS = st.sampled_from(sorted(IDENTITY_CHANGES)) | st.sampled_from(sorted(NOT_IDENTITY))


def _touches(case: str) -> str:
    return IDENTITY_CHANGES[case][2] if case in IDENTITY_CHANGES else NOT_IDENTITY[case][1]


@settings(max_examples=200, deadline=None)
@given(cases=st.lists(EDITS, max_size=5, unique_by=_touches), layout_seed=st.integers(0, 2**32 - 1),
       comments=st.booleans())
def test_fuzzed_spec_edits_change_the_fingerprint_exactly_when_one_changes_the_identity(
        cases: list[str], layout_seed: int, comments: bool) -> None:
    """Any mix of edits (each to its own setting, so none undoes another), rendered with shuffled keys and comment
    lines: the fingerprint moves iff one of them is a change of identity, and every such change is named."""
    document = _copy(BASE)
    for case in cases:
        (IDENTITY_CHANGES[case][0] if case in IDENTITY_CHANGES else NOT_IDENTITY[case][0])(document)
    before = parsed(BASE)
    after = parsed(document, order=random.Random(layout_seed), comments=comments)
    identity_edits = [case for case in cases if case in IDENTITY_CHANGES]
    assert (fingerprint(after) != fingerprint(before)) == bool(identity_edits)
    described = "; ".join(changes(identity(before), identity(after)))
    for case in identity_edits:
        assert re.search(IDENTITY_CHANGES[case][1], described), (case, described)
    if not identity_edits:
        assert described == ""


@settings(max_examples=60, deadline=None)
@given(high=st.floats(0.02, 10.0, allow_nan=False), low=st.floats(1e-4, 0.01, allow_nan=False))
def test_any_other_range_is_another_identity(high: float, low: float) -> None:
    document = edited(_set("search/lr", {"type": "float", "low": low, "high": high, "log": True}))
    same = low == 0.01 and high == 1.0
    assert (fingerprint(parsed(document)) == fingerprint(parsed(BASE))) == same


# End to end: the real CLI, real MNIST, the default SQLite storage and embedded MLflow store.

def write(directory: Path, document: dict, file_name: str = "ident.toml", **render_options) -> Path:
    path = directory / file_name
    path.write_text(render(document, **render_options))
    return path


def study_run(spec: Path, *extra: str, cwd: Path):
    return run_cli("study", "run", str(spec), "--data-dir", str(SHARED_DATA), *extra, cwd=cwd)


def stored_trials(cwd: Path, name: str = "ident") -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/mlruns/studies/{name}.db").get_trials()


@pytest.fixture(scope="module")
def ran_study(tmp_path_factory) -> Path:
    """A folder holding one finished study of ``BASE`` (2 trials)."""
    cwd = tmp_path_factory.mktemp("study")
    completed = study_run(write(cwd, BASE), cwd=cwd)
    assert completed.returncode == 0, completed.stderr
    return cwd


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("case", ["narrowed range", "added parameter", "objective metric", "more epochs"])
def test_a_rerun_with_a_changed_spec_is_refused_and_writes_nothing(case: str, ran_study: Path,
                                                                   tmp_path: Path) -> None:
    cwd = copy_of(ran_study, tmp_path)
    change, named, _ = IDENTITY_CHANGES[case]
    spec = write(cwd, edited(change))
    assert_refused(["study", "run", str(spec), "--data-dir", str(SHARED_DATA)],
                   r"study: 'ident' in sqlite:///.*ident\.db was made from another spec \(version 1, .*\): .*"
                   + named + r".*--new-spec-version", cwd)
    assert len(stored_trials(cwd)) == 2
    runs = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db").search_experiments()])
    assert len(runs) == 3  # the parent and two trials, as the first run left them


@pytest.mark.slow
def test_two_spec_files_sharing_a_name_are_refused(ran_study: Path, tmp_path: Path) -> None:
    cwd = copy_of(ran_study, tmp_path)
    other = write(cwd, edited(_set("search/momentum", {"type": "float", "low": 0.0, "high": 0.9})), "other.toml")
    assert_refused(["study", "run", str(other), "--data-dir", str(SHARED_DATA)],
                   r"'ident' .* another spec \(version 1, .*ident\.toml\): search\.momentum added", cwd)


@pytest.mark.slow
def test_a_rerun_with_comments_key_order_and_more_trials_resumes(ran_study: Path, tmp_path: Path) -> None:
    cwd = copy_of(ran_study, tmp_path)
    spec = write(cwd, edited(_set("budget/n_trials", 3)), order=random.Random(7), comments=True)
    completed = study_run(spec, cwd=cwd)
    assert completed.returncode == 0, completed.stderr
    trials = stored_trials(cwd)
    assert len(trials) == 3 and {trial.user_attrs.get(VERSION_ATTR) for trial in trials} == {1}


@pytest.mark.slow
def test_new_spec_version_continues_the_study_and_tags_its_later_trials(ran_study: Path, tmp_path: Path) -> None:
    cwd = copy_of(ran_study, tmp_path)
    spec = write(cwd, edited(_set("search/lr/high", 0.5)))
    completed = study_run(spec, "--new-spec-version", "--n-trials", "4", cwd=cwd)
    assert completed.returncode == 0, completed.stderr
    assert "spec version 2 (search.lr.high 1 -> 0.5)" in completed.stderr
    study = optuna.load_study(study_name="ident", storage=f"sqlite:///{cwd}/mlruns/studies/ident.db")
    versions = {trial.number: trial.user_attrs.get(VERSION_ATTR) for trial in study.trials}
    assert versions == {0: 1, 1: 1, 2: 2, 3: 2}
    assert all(trial.params["lr"] <= 0.5 for trial in study.trials if versions[trial.number] == 2)
    assert study.user_attrs[VERSION_ATTR] == 2
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ident").experiment_id])
    tags = {run.data.tags.get("optuna.trial_number"): run.data.tags.get(VERSION_TAG) for run in runs}
    assert tags == {"0": "1", "1": "1", "2": "2", "3": "2", None: "2"}  # None: the parent run
    shown = run_cli("study", "show", "ident", cwd=cwd, check=True).stdout
    assert "spec_version" in shown and "(spec version " in shown
    again = study_run(spec, "--n-trials", "4", cwd=cwd)  # version 2 is now the study's spec: no flag needed
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_a_study_from_before_spec_versions_records_its_spec(tmp_path: Path) -> None:
    spec = write(tmp_path, BASE)
    (tmp_path / "mlruns" / "studies").mkdir(parents=True)
    old = optuna.create_study(study_name="ident", storage=f"sqlite:///{tmp_path}/mlruns/studies/ident.db",
                              direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions={
        "lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}, value=0.5))
    completed = study_run(spec, "--n-trials", "2", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "no spec recorded with its trials" in completed.stderr
    assert optuna.load_study(study_name="ident", storage=f"sqlite:///{tmp_path}/mlruns/studies/ident.db"
                             ).user_attrs[VERSION_ATTR] == 1


# The study's other inputs, checked before anything is created.

def test_a_broken_data_file_is_refused_before_the_study_exists(tmp_path: Path) -> None:
    data = npz(tmp_path / "data", y_train=with_label(10))
    spec = write(tmp_path, BASE)
    assert_refused(["study", "run", str(spec), "--data-dir", str(data)],
                   r"mnist\.npz: train labels from 0 to 10; dataset 'mnist' has 10 classes", tmp_path)


@pytest.mark.parametrize("workers", ["1000", str(max_workers() + 1)])
def test_absurd_worker_counts_are_refused(workers: str, tmp_path: Path) -> None:
    spec = write(tmp_path, BASE)
    assert_refused(["study", "run", str(spec), "--data-dir", str(SHARED_DATA), "--workers", workers],
                   rf"--workers: {workers} is out of range; this machine runs at most \d+ local workers", tmp_path)


@pytest.mark.slow
def test_workers_beyond_the_trials_left_are_not_started(tmp_path: Path) -> None:
    spec = write(tmp_path, BASE)
    completed = study_run(spec, "--workers", "3", "--n-trials", "1", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "--workers: 3 capped at 1: the study has 1 trial(s) left to run" in completed.stderr
    assert len(stored_trials(tmp_path)) == 1


@pytest.mark.parametrize("change, message", [
    ({"train": {**BASE["train"], "precision": "tf32"}}, r"precision: 'tf32' needs device cuda, got cpu; on cpu use "
                                                        r"fp32, bf16"),
    ({"train": {**BASE["train"], "device": "mps"}}, r"device: 'mps' requested but not available on this machine"),
    ({"train": {**BASE["train"], "step": "graph"}}, r"step: 'graph' needs device cuda, got cpu; on cpu use eager, "
                                                    r"compiled"),
])
def test_a_fixed_device_or_precision_that_cannot_run_here_is_refused_before_the_study_exists(
        change: dict, message: str, tmp_path: Path) -> None:
    """A searched one is not: a trial that draws it fails alone, and the study goes on (``test_study``)."""
    if change["train"].get("device") == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    spec = write(tmp_path, {**BASE, **change})
    assert_refused(["study", "run", str(spec), "--data-dir", str(SHARED_DATA)], message, tmp_path)
