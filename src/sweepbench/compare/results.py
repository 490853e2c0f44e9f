"""What a comparison's member studies hold, read back from their Optuna storage: per finished trial (in trial
order) its objective value and training seconds, and the study's wall time. The report is built from these
alone, so a rerun on another machine with the same storage gives the same table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..study.job import default_storage_url
from ..study.storage import _quiet, reader, stored_study_names
from .spec import Comparison
from .stats import best_so_far, oriented

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class MemberResult:
    """One sampler x seed study: ``scores`` oriented (higher is better), NaN for a pruned trial, which has no
    final value; ``seconds`` each finished trial's training time."""

    sampler: str
    seed: int
    scores: np.ndarray
    seconds: np.ndarray
    wall_seconds: float

    @property
    def curve(self) -> np.ndarray:
        return best_so_far(self.scores)

    @property
    def final_best(self) -> float:
        return float(self.curve[-1]) if len(self.curve) else float("nan")


def member_storage(comparison: Comparison, sampler: str, seed: int, storage_url: str | None) -> str:
    return storage_url or default_storage_url(comparison.member_name(sampler, seed))


def load_member(comparison: Comparison, sampler: str, seed: int, storage_url: str | None) -> optuna.Study | None:
    """The member study, or None when it was not made yet; creates nothing."""
    url = member_storage(comparison, sampler, seed, storage_url)
    name = comparison.member_name(sampler, seed)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    if name not in stored_study_names(url):
        return None
    with _quiet():
        return optuna.load_study(study_name=name, storage=reader(url))


def member_result(comparison: Comparison, sampler: str, seed: int, study: optuna.Study) -> MemberResult:
    trials = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda trial: trial.number)
    trials = trials[:comparison.study.target_trials()]
    values = [trial.value if trial.state == TrialState.COMPLETE else np.nan for trial in trials]
    return MemberResult(sampler, seed, oriented(values, comparison.direction),
                        np.array([_train_seconds(trial) for trial in trials], dtype=float),
                        _wall_seconds(study.get_trials(deepcopy=False)))


def load_results(comparison: Comparison, storage_url: str | None) -> list[MemberResult]:
    """Every member study that has reached its target, in the comparison's order (seed by seed)."""
    results = []
    for sampler, seed in comparison.members():
        study = load_member(comparison, sampler, seed, storage_url)
        if study is None:
            continue
        result = member_result(comparison, sampler, seed, study)
        if len(result.scores) >= comparison.study.target_trials():
            results.append(result)
    return results


def _train_seconds(trial: FrozenTrial) -> float:
    """The trial's share of the engine's training time (a fused pack's time split over its members), or the
    trial's duration for a trial that has none recorded."""
    seconds = trial.user_attrs.get("train_seconds")
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return float("nan") if seconds is None else float(seconds) / trial.user_attrs.get("pack_size", 1)


def _wall_seconds(trials: list[FrozenTrial]) -> float:
    starts = [trial.datetime_start for trial in trials if trial.datetime_start]
    ends = [trial.datetime_complete for trial in trials if trial.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
