"""Packed studies (``budget.pack`` / ``--pack``): a worker reserves several trials at once and trains those that
share an architecture fused; the exactly-N, SIGKILL + resume and MLflow guarantees hold for every member."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import run_cli
from tests.test_study import (assert_exactly, assert_runs_match_trials, failures, sqlite_storage, sqlite_tracking,
                              start_cli, study_args, wait_for_running_trial, write_spec)
from sweepbench.study import RETRY_HISTORY

pytestmark = pytest.mark.slow

PACKABLE_SEARCH = """
[search.lr]
type = "float"
low = 1e-3
high = 1e-1
log = true
[search.optimizer]
type = "categorical"
choices = ["sgd", "adam", "adadelta"]
[search.weight_decay]
type = "float"
low = 1e-6
high = 1e-3
log = true
"""


def packed_spec(directory: Path, name: str, n_trials: int, pack: int, epochs: int = 2, subset: int = 4000) -> Path:
    spec = write_spec(directory, name, n_trials=n_trials, epochs=epochs, subset=subset, pruner="none",
                      search=PACKABLE_SEARCH)
    spec.write_text(spec.read_text().replace("[budget]", f"[budget]\npack = {pack}"))
    return spec


def assert_members_fused(study: optuna.Study, children: dict) -> None:
    """Every finished trial's run has its own per-epoch metrics; runs trained in a pack say so and agree on it."""
    packs: dict[str, list[int]] = {}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run = children[trial.number]
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value), trial.number
        if run.data.tags.get("sweepbench.fused") == "true":
            packs.setdefault(run.data.tags["sweepbench.pack_id"], []).append(trial.number)
            assert run.data.tags["sweepbench.epoch_time"] == "pack"
        else:
            assert run.data.tags["sweepbench.fused"] == "false", "a trial trained alone says so"
    assert packs, "no trial was trained fused"
    for pack_id, numbers in packs.items():
        sizes = {children[number].data.tags["sweepbench.pack_size"] for number in numbers}
        assert len(sizes) == 1 and int(sizes.pop()) >= len(numbers), (pack_id, numbers)


def test_a_packed_study_with_two_workers_ends_with_exactly_n_trials_each_its_own_run(tmp_path: Path,
                                                                                     data_dir: Path) -> None:
    spec = packed_spec(tmp_path, "packed", n_trials=7, pack=3)
    completed = run_cli(*study_args(spec, data_dir, "--workers", "2"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    study = optuna.load_study(study_name="packed", storage=sqlite_storage(tmp_path, "packed"))
    assert_exactly(study, 7)
    assert not failures(study)
    parent, children = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert parent.info.status == "FINISHED"
    assert_members_fused(study, children)


def test_a_killed_pack_is_queued_again_whole_and_the_resumed_study_ends_with_exactly_n(tmp_path: Path,
                                                                                       data_dir: Path) -> None:
    spec = packed_spec(tmp_path, "killedpack", n_trials=6, pack=3, epochs=4, subset=10000)
    args = study_args(spec, data_dir, "--heartbeat-interval", "1")
    process = start_cli(args, tmp_path)
    wait_for_running_trial(tmp_path, "killedpack", process, members=3)
    running = [trial.number for trial in optuna.load_study(
        study_name="killedpack", storage=sqlite_storage(tmp_path, "killedpack")).get_trials(
        states=(TrialState.RUNNING,))]
    process.kill()
    process.communicate()
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    study = optuna.load_study(study_name="killedpack", storage=sqlite_storage(tmp_path, "killedpack"))
    assert_exactly(study, 6)
    retried = {number for trial in study.trials for number in trial.system_attrs.get(RETRY_HISTORY, [])}
    assert len(running) > 1 and set(running) <= retried, (running, retried)
    for number in running:
        retry = [trial for trial in study.trials if trial.system_attrs.get(RETRY_HISTORY) == [number]]
        assert len(retry) == 1 and retry[0].params == study.trials[number].params and retry[0].state.is_finished()
    parent, children = assert_runs_match_trials(study, sqlite_tracking(tmp_path))
    assert parent.info.status == "FINISHED"
    assert_members_fused(study, children)
